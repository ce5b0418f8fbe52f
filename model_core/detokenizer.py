"""Streaming detokenization: token ids in, final text pieces out, incomplete UTF-8 held back."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    """What the detokenizer reads of a tokenizer (model_core.tokenizer.Tokenizer is one; this module does not
    import it, so the two do not import each other)."""

    mode: str  # "byte_level" | "sentencepiece" | "generic"
    byte_token_ids: frozenset[int]
    special_token_ids: frozenset[int]
    strip_leading_space: bool

    def token_bytes(self, i: int) -> bytes: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 characters.

    The concatenation of all `step()` results and `flush()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run = bytearray()  # sentencepiece: pending byte-fallback tokens
        self._strip = tokenizer.strip_leading_space
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
            if token_id in self._tok.byte_token_ids:
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
