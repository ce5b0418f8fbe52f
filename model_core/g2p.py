"""Grapheme-to-phoneme conversion with the encoder-decoder Transformer (`seq2seq.py`), trained on CMUdict.

Characters in, ARPAbet phones with stress out, as CMUdict writes them: "hello" -> "HH AH0 L OW1".
`G2PConfig` holds both vocabularies and the Seq2Seq shape; a checkpoint is a directory with
`config.json` and `model.safetensors` (`checkpoint.py`), validated at load like the GAN's. `G2P` normalises and encodes
words, and decodes batches three ways: greedy and sampled rows together (`decode`, with the sampling
functions the LM uses), or beam search (`beam_search`). Every decoder keeps the self-attention K/V in a
`DecoderCache`, and computes each request's cross-attention K/V once from the encoder memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_core.checkpoint import config_fields, read_config, read_tensors, write_checkpoint
from model_core.sampling import SamplingParams, process_logits, sample
from model_core.seq2seq import DecoderCache, Seq2SeqConfig, Seq2SeqTransformer

# CMUdict's alphabet (words are lowercase there; input is lowercased) and its 39 phonemes, vowels with stress
GRAPHEMES = tuple("'-.abcdefghijklmnopqrstuvwxyz")
_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
_CONSONANTS = (
    "B",
    "CH",
    "D",
    "DH",
    "F",
    "G",
    "HH",
    "JH",
    "K",
    "L",
    "M",
    "N",
    "NG",
    "P",
    "R",
    "S",
    "SH",
    "T",
    "TH",
    "V",
    "W",
    "Y",
    "Z",
    "ZH",
)
PHONES = tuple(sorted([v + s for v in _VOWELS for s in "012"] + list(_CONSONANTS)))
SRC_SPECIALS = ("<pad>",)
TGT_SPECIALS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class WordError(ValueError):
    """A word the model cannot read (empty, too long, or with characters outside its alphabet)."""


@dataclass(frozen=True)
class G2PConfig:
    graphemes: tuple[str, ...] = GRAPHEMES
    phones: tuple[str, ...] = PHONES
    max_word_len: int = 32  # longest word accepted, in characters
    max_phones: int = 48  # decoding stops after this many phones
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    dropout: float = 0.05
    activation: str = "relu"
    norm_first: bool = True  # pre-norm trains without a long warm-up

    def __post_init__(self) -> None:
        for name in (
            "max_word_len",
            "max_phones",
            "d_model",
            "n_heads",
            "d_ff",
            "n_encoder_layers",
            "n_decoder_layers",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"G2PConfig.{name} must be a positive int, got {v!r}")
        for name, vocab in (("graphemes", self.graphemes), ("phones", self.phones)):
            if not vocab or len(set(vocab)) != len(vocab) or not all(isinstance(t, str) and t for t in vocab):
                raise ValueError(f"G2PConfig.{name} must be distinct non-empty strings")
        if any(len(g) != 1 for g in self.graphemes):
            raise ValueError("G2PConfig.graphemes must be single characters")
        self.seq2seq_config()  # validates the shape (d_model % n_heads)

    def seq2seq_config(self) -> Seq2SeqConfig:
        return Seq2SeqConfig(
            src_vocab_size=len(SRC_SPECIALS) + len(self.graphemes),
            tgt_vocab_size=len(TGT_SPECIALS) + len(self.phones),
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_encoder_layers=self.n_encoder_layers,
            n_decoder_layers=self.n_decoder_layers,
            dropout=self.dropout,
            activation=self.activation,
            norm_first=self.norm_first,
            max_len=max(self.max_word_len, self.max_phones + 1),
            pad_id=PAD_ID,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphemes"], d["phones"] = list(self.graphemes), list(self.phones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> G2PConfig:
        kwargs = config_fields(cls, d, "G2P")
        for k in ("graphemes", "phones"):
            if k in kwargs:
                if not isinstance(kwargs[k], list):
                    raise ValueError(f"{k} must be a list of strings")
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)


@dataclass
class Hypothesis:
    """One transcription: its phones and the sum of their log-probabilities (EOS included)."""

    phones: list[str]
    logprob: float = 0.0
    finished: bool = True  # False: cut at max_phones before EOS
    score: float = field(default=0.0, repr=False)  # beam search's ranking score


class G2P:
    """A trained model with its vocabularies: words in, phones out."""

    def __init__(self, config: G2PConfig, model: Seq2SeqTransformer | None = None) -> None:
        self.config = config
        self.model = model if model is not None else Seq2SeqTransformer(config.seq2seq_config())
        self._src_ids = {g: i + len(SRC_SPECIALS) for i, g in enumerate(config.graphemes)}
        self.alphabet = "".join(config.graphemes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def accepted(self) -> str:
        """The accepted characters, in words (for error messages)."""
        letters = "".join(g for g in self.config.graphemes if g.isalpha())
        if letters == "abcdefghijklmnopqrstuvwxyz":
            letters = "a-z"
        names = {"'": "apostrophe", "-": "hyphen", ".": "period"}
        others = [f"{names.get(g, 'character')} {g}" for g in self.config.graphemes if not g.isalpha()]
        parts = [f"letters {letters} (either case)", *others]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def normalize(self, word: str) -> str:
        """Strip and lowercase a word, or raise WordError naming what is wrong and what is accepted. Characters are
        checked before lowercasing, as ASCII: the Kelvin sign (U+212A) or a dotted capital I lowercase to ASCII
        letters in Python, and are refused like any other non-ASCII letter."""
        if not isinstance(word, str):
            raise WordError(f"a word must be a string, got {type(word).__name__}")
        stripped = word.strip()
        if not stripped:
            raise WordError(f"empty word; a word is 1 to {self.config.max_word_len} characters: {self.accepted()}")
        if len(stripped) > self.config.max_word_len:
            raise WordError(f"word of {len(stripped)} characters; at most {self.config.max_word_len} are accepted")
        bad = sorted({c for c in stripped if not c.isascii() or c.lower() not in self._src_ids})
        if bad:
            raise WordError(f"unsupported characters {''.join(bad)!r} in {word!r}; accepted: {self.accepted()}")
        return stripped.lower()

    def encode(self, words: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised words -> source ids (B, S) and padding mask (B, S), True = pad."""
        S = max(len(w) for w in words)
        src = torch.full((len(words), S), PAD_ID, dtype=torch.long)
        for i, w in enumerate(words):
            src[i, : len(w)] = torch.tensor([self._src_ids[c] for c in w])
        return src.to(self.device), (src == PAD_ID).to(self.device)

    def phones_of(self, ids: Sequence[int]) -> list[str]:
        """Target ids -> phones, stopping at EOS, skipping specials."""
        out = []
        for t in ids:
            if t == EOS_ID:
                break
            if t >= len(TGT_SPECIALS):
                out.append(self.config.phones[t - len(TGT_SPECIALS)])
        return out

    def phone_ids(self, phones: Sequence[str]) -> list[int]:
        index = {p: i + len(TGT_SPECIALS) for i, p in enumerate(self.config.phones)}
        return [index[p] for p in phones]

    # ---- decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        words: Sequence[str],
        params: Sequence[SamplingParams] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        on_step: Callable[[list[int], list[str]], None] | None = None,
    ) -> list[Hypothesis]:
        """Greedy (temperature 0, the default) and sampled rows in one batch: one encoder pass, then one
        decoder step per phone for the rows still running. words must be normalised.

        params[i].max_tokens caps row i's phones (at most config.max_phones); on_step(rows, phones) is
        called after every step with the rows (indices into words) that emitted a phone and those phones.
        """
        B = len(words)
        params = (
            list(params)
            if params is not None
            else [SamplingParams(max_tokens=self.config.max_phones, temperature=0.0)] * B
        )
        gens = list(generators) if generators is not None else [None] * B
        limit = [min(p.max_tokens, self.config.max_phones) for p in params]
        self.model.eval()
        src, pad = self.encode(words)
        memory = self.model.encode(src, pad)  # (B, S, C)
        cache = DecoderCache()
        rows = list(range(B))  # the rows still decoding, in cache order
        out: list[list[int]] = [[] for _ in range(B)]
        logprob = [0.0] * B
        finished = [False] * B
        inp = torch.full((B, 1), BOS_ID, dtype=torch.long, device=src.device)
        while rows:
            logits = self.model.decode(inp, memory, memory_pad_mask=pad, cache=cache)[:, -1]  # (b, V)
            logits[:, PAD_ID] = logits[:, BOS_ID] = float("-inf")
            p = [params[r] for r in rows]
            x = process_logits(logits, p, [[] for _ in rows], [out[r] for r in rows])
            nxt = sample(x, p, [gens[r] for r in rows])  # (b,)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None])[:, 0]  # model's logprob
            keep, emitted_rows, emitted = [], [], []
            for j, (r, t, l) in enumerate(zip(rows, nxt.tolist(), lp.tolist())):
                logprob[r] += l
                if t == EOS_ID:
                    finished[r] = True
                    continue
                out[r].append(t)
                emitted_rows.append(r)
                emitted.append(self.config.phones[t - len(TGT_SPECIALS)])
                if len(out[r]) < limit[r]:
                    keep.append(j)
            if on_step is not None and emitted_rows:
                on_step(emitted_rows, emitted)
            if len(keep) < len(rows):  # drop finished rows from the batch
                if not keep:
                    break
                idx = torch.tensor(keep, dtype=torch.long, device=src.device)
                cache.select(idx)
                pad, nxt = pad.index_select(0, idx), nxt.index_select(0, idx)
                rows = [rows[j] for j in keep]
            inp = nxt[:, None]
        return [Hypothesis(self.phones_of(out[i]), logprob[i], finished[i]) for i in range(B)]

    def greedy(self, words: Sequence[str]) -> list[list[str]]:
        """Normalised words -> their greedy transcriptions."""
        return [h.phones for h in self.decode(words)]

    @torch.no_grad()
    def beam_search(
        self,
        words: Sequence[str],
        width: int = 4,
        n: int = 1,
        length_penalty: float = 0.0,
        max_phones: int | None = None,
    ) -> list[list[Hypothesis]]:
        """Batched beam search: per word the n best of `width` beams, best first.

        Hypotheses rank by logprob / len**length_penalty (len counts EOS); a word stops once `width`
        hypotheses have ended. Rows of finished words leave the batch. width 1 equals greedy decoding.
        """
        if not 1 <= n <= width:
            raise ValueError(f"need 1 <= n <= width, got n={n}, width={width}")
        B, K = len(words), width
        limit = min(max_phones or self.config.max_phones, self.config.max_phones)
        self.model.eval()
        src, pad = self.encode(words)
        memory = self.model.encode(src, pad)  # (B, S, C)
        cache = DecoderCache()
        cache.memory_kv = self.model.decoder.project_memory(memory)  # (B, ...) once per word
        rep = torch.arange(B, device=src.device).repeat_interleave(K)  # (B*K,)
        cache.select(rep)
        pad = pad.index_select(0, rep)
        active = list(range(B))  # words still searching, in batch order
        seqs: list[list[int]] = [[] for _ in range(B * K)]  # per row (word-major)
        scores = torch.full((B, K), float("-inf"), device=src.device)
        scores[:, 0] = 0.0  # only beam 0 is live at the start
        done: list[list[Hypothesis]] = [[] for _ in range(B)]
        inp = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=src.device)

        def rank(logprob: float, length: int) -> float:
            return logprob / (length**length_penalty) if length_penalty else logprob

        for step in range(limit + 1):
            logits = self.model.decode(inp, memory, memory_pad_mask=pad, cache=cache)[:, -1]  # (b*K, V)
            logits[:, PAD_ID] = logits[:, BOS_ID] = float("-inf")
            if step == limit:  # out of phones: every live beam must end here
                keep_eos = logits[:, EOS_ID].clone()
                logits.fill_(float("-inf"))
                logits[:, EOS_ID] = keep_eos
            lp = torch.log_softmax(logits.float(), dim=-1)  # (b*K, V)
            V = lp.shape[-1]
            total = (scores[:, :, None] + lp.view(len(active), K, V)).view(len(active), K * V)
            top_v, top_i = total.topk(2 * K, dim=-1)  # (b, 2K): enough to keep K live after K end
            new_rows, new_tok, new_scores, new_seqs, still = [], [], [], [], []
            for a, w in enumerate(active):
                live: list[tuple[int, int, float]] = []
                for v, i in zip(top_v[a].tolist(), top_i[a].tolist()):
                    if v == float("-inf") or len(live) == K:
                        break
                    beam, tok = divmod(i, V)
                    prev = seqs[a * K + beam]
                    if tok == EOS_ID:  # (at step == limit the end is forced: the phones ran out)
                        if len(done[w]) < K:
                            done[w].append(Hypothesis(self.phones_of(prev), v, step < limit, rank(v, len(prev) + 1)))
                        continue
                    live.append((a * K + beam, tok, v))
                if len(done[w]) >= K or not live:
                    continue
                while len(live) < K:  # pad with dead beams
                    live.append((live[0][0], live[0][1], float("-inf")))
                still.append(w)
                for row, tok, v in live:
                    new_rows.append(row)
                    new_tok.append(tok)
                    new_scores.append(v)
                    new_seqs.append(seqs[row] + [tok])
            if not still:
                break
            idx = torch.tensor(new_rows, dtype=torch.long, device=src.device)
            cache.select(idx)
            pad = pad.index_select(0, idx)
            active, seqs = still, new_seqs
            scores = torch.tensor(new_scores, device=src.device).view(len(active), K)
            inp = torch.tensor(new_tok, dtype=torch.long, device=src.device)[:, None]
        for a, w in enumerate(active):  # words that never filled K ends (cannot happen past `limit`)
            for k in range(K):
                if len(done[w]) < K and scores[a, k] > float("-inf"):
                    s = float(scores[a, k])
                    done[w].append(Hypothesis(self.phones_of(seqs[a * K + k]), s, False, rank(s, len(seqs[a * K + k]))))
        return [sorted(d, key=lambda h: -h.score)[:n] for d in done]


# ---- metrics -----------------------------------------------------------------------------------------


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def score(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """Phone error rate (edit distance / reference phones) and word error rate against, per word, the
    closest of its reference pronunciations (fewest edits, then the shortest)."""
    errors = phones = wrong = 0
    for pred, refs in zip(predictions, references, strict=True):
        d, n = min((edit_distance(pred, r), len(r)) for r in refs)
        errors, phones, wrong = errors + d, phones + n, wrong + (d > 0)
    n_words = max(len(predictions), 1)
    return {
        "per": errors / max(phones, 1),
        "wer": wrong / n_words,
        "words": len(predictions),
        "phones": phones,
        "errors": errors,
    }


# ---- checkpoint --------------------------------------------------------------------------------------


def default_g2p_path() -> Path:
    """The checkpoint shipped with the package."""
    return Path(__file__).parent / "assets" / "g2p"


def save_g2p(
    g2p: G2P, path_dir: str | Path, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write `config.json` (+ `extra` under "training") and `model.safetensors` with tensors in `dtype`
    (loading casts back to float32). The output projection is tied to the target embedding: not stored."""
    state = {k: v for k, v in g2p.model.state_dict().items() if k != "lm_head.weight"}
    return write_checkpoint(path_dir, g2p.config.to_dict(), state, model="g2p-seq2seq", extra=extra, dtype=dtype)


def load_g2p(path_dir: str | Path | None = None, device: str | torch.device = "cpu") -> G2P:
    """Load a checkpoint directory, validating the config and every tensor's name, shape and values."""
    d = Path(path_dir) if path_dir is not None else default_g2p_path()
    g2p = G2P(read_config(d, "G2P", G2PConfig.from_dict))
    expected = {k: v for k, v in g2p.model.state_dict().items() if k != "lm_head.weight"}  # tied to tgt_embed
    g2p.model.load_state_dict(read_tensors(d, expected), strict=False)
    g2p.model.to(device).eval()
    return g2p


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
