"""`Tokenizer`: encode/decode text and render chat prompts, built from a GGUF file or a tokenizer.json directory.

It wraps a `tokenizers.Tokenizer`: for GGUF files one rebuilt from the metadata (`tokenizer_backends`), for
Hugging Face directories the one in tokenizer.json. Streaming decode is `detokenizer`, chat templates are
rendered by `chat_template`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders

from model_core.chat_template import ChatTemplateError, render_chat_template
from model_core.detokenizer import IncrementalDetokenizer
from model_core.tokenizer_backends import (
    BYTE,
    NORMAL,
    UNKNOWN,
    byte_level_backend,
    char_to_byte,
    rstrip_tokens,
    sentencepiece_backend,
    set_post_processor,
)
from model_core.weights.gguf_reader import read_metadata

# texts (characters) and id lists longer than this use the tokenizers calls that release the GIL
_GIL_FREE_ABOVE = 4096

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
        self.byte_token_ids = byte_token_ids  # sentencepiece: the <0xNN> byte-fallback tokens
        self.strip_leading_space = strip_leading_space  # decoding drops one leading space
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
        md = dict(metadata) if metadata is not None else read_metadata(path)
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
            backend = byte_level_backend(tokens, types, merges, str(md.get("tokenizer.ggml.pre", "default")))
            byte_ids: frozenset[int] = frozenset()
            strip = False
        else:
            if unk is None:
                unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
            strip = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            scores = [float(s) for s in md.get("tokenizer.ggml.scores", [0.0] * len(tokens))]
            rstrip = rstrip_tokens(str(md.get("general.name", "")), tokens, types)
            backend = sentencepiece_backend(tokens, types, scores, merges, unk, strip, rstrip)
            byte_ids = frozenset(i for i, t in enumerate(types) if t == BYTE)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        set_post_processor(backend, tokens, bos if add_bos else None, eos if add_eos else None)
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
            set_post_processor(backend, names, bos if want_bos else None, eos if want_eos else None)
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
            c2b = char_to_byte()
            if all(c in c2b for c in tok):
                return bytes(c2b[c] for c in tok)
            return tok.encode("utf-8")
        if self.mode == "sentencepiece":
            if i in self.byte_token_ids:
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
        return render_chat_template(
            template, {"messages": messages, "add_generation_prompt": add_generation_prompt, **variables}
        )


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
