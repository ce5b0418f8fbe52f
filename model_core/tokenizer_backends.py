"""`tokenizers` backends rebuilt from a GGUF file's tokenizer metadata (llama.cpp's `tokenizer.ggml.*`).

"gpt2" is byte-level BPE with the pre-tokenizer regex named by `tokenizer.ggml.pre`; "llama" is
SentencePiece-style BPE with byte fallback and merges ranked by the scores of the merged pieces. Control,
unknown and user-defined tokens become added tokens; BOS/EOS are added by a template post-processor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

log = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits, as llama.cpp picks them from tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRES = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "stablelm2"}
_DIGITS_THEN_GPT2_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_SPLIT_PRES = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_IGNORE_MERGES_PRES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"}


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    table = {b: chr(b) for b in [*printable, *range(ord("®"), ord("ÿ") + 1)]}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_char`."""
    return {c: b for b, c in byte_to_char().items()}


def byte_level_backend(tokens: list[str], types: list[int], merges: list[str] | None, pre: str) -> Backend:
    """GGUF "gpt2": byte-level BPE, split first as llama.cpp does for `tokenizer.ggml.pre` == `pre`."""
    b2c = byte_to_char()
    alphabet = set(b2c.values())

    def spell(t: str) -> str:  # a piece written outside the byte alphabet: spell out its UTF-8 bytes
        return t if set(t) <= alphabet else "".join(b2c[b] for b in t.encode("utf-8"))

    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        key = t if ty in (CONTROL, USER_DEFINED) else spell(t)
        if key in vocab:
            log.debug("duplicate token %r at id %d (kept id %d)", key, i, vocab[key])
            continue
        vocab[key] = i
    pairs = []
    for m in merges or []:
        parts = m.split(" ")
        if len(parts) == 2:
            pairs.append((spell(parts[0]), spell(parts[1])))
    if merges is None:
        log.warning("GGUF has no tokenizer.ggml.merges; BPE will not merge")
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRES))
    if pre in _SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_THEN_GPT2_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre not in _GPT2_PRES:
            log.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 pre-tokenizer regex", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    _add_added_tokens(backend, tokens, types)
    return backend


def sentencepiece_backend(
    tokens: list[str],
    types: list[int],
    scores: list[float],
    merges: list[str] | None,
    unk: int | None,
    add_space_prefix: bool,
    rstrip: frozenset[str] = frozenset(),
) -> Backend:
    """GGUF "llama": SentencePiece-style BPE with byte fallback (merges from `scores` when the file has none)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if merges is not None:
        pairs = [(m.split(" ", 1)[0], m.split(" ", 1)[1]) for m in merges if " " in m]
    else:  # SentencePiece merges the adjacent pair whose result scores highest
        ranked = []
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
            if ty != NORMAL or vocab.get(t) != i:
                continue
            for k in range(1, len(t)):
                if t[:k] in vocab and t[k:] in vocab:
                    ranked.append((-scores[i], i, k))
        ranked.sort()
        pairs = [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]
    model = models.BPE(
        vocab=vocab, merges=pairs, unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True
    )
    backend = Backend(model)
    # spaces become U+2581; with add_space_prefix one more goes before the text and after every special or
    # user-defined token (llama.cpp's rule; a normalizer runs on each stretch of text between added tokens, as in
    # Llama 2's tokenizer.json), even where the text starts with a space
    spaces = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_space_prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_added_tokens(backend, tokens, types, rstrip)
    return backend


def rstrip_tokens(model_name: str, tokens: Sequence[str], types: Sequence[int]) -> frozenset[str]:
    """The added tokens that swallow the whitespace after them: llama.cpp's rule for models named Phi-3 (its
    special tokens but <unk>, <s> and <|endoftext|>, plus </s>), none otherwise."""
    name = model_name.lower()
    if "phi-3" not in name and "phi3" not in name:
        return frozenset()
    special = {t for t, ty in zip(tokens, types, strict=True) if ty in (CONTROL, UNKNOWN, USER_DEFINED)}
    return frozenset((special | {"</s>"}) - {"<unk>", "<s>", "<|endoftext|>"})


def _add_added_tokens(
    backend: Backend, tokens: list[str], types: list[int], rstrip: frozenset[str] = frozenset()
) -> None:
    """Control/unknown tokens match whole and count as special; user-defined ones match whole; those in rstrip
    take the whitespace after them along."""
    special = [
        AddedToken(t, special=True, normalized=False, rstrip=t in rstrip)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False, rstrip=t in rstrip)
        for t, ty in zip(tokens, types, strict=True)
        if ty == USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def set_post_processor(
    backend: Backend, names: Sequence[str] | Mapping[int, str], bos: int | None, eos: int | None
) -> None:
    """Add BOS/EOS around encoded text when the model asks for them."""
    if bos is None and eos is None:
        return
    head = [names[bos]] if bos is not None else []
    tail = [names[eos]] if eos is not None else []
    single = " ".join([*head, "$A", *tail])
    pair = " ".join([*head, "$A", *tail, *head, "$B:1", *tail])
    ids = [(names[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
