"""What one forward's attention needs to know of a paged KV cache: a value made per step, not state on the cache.

`PagedKVCache.prepare()` takes the block tables and start positions of a batch of B sequences, each computing
T new tokens (shorter rows padded), and returns a `StepAttention`: the tokens' positions, the attention mask
(or that none is needed), where to write the new keys and values, which rows to read back, and, where the
cache attends in place (its native kernel reads each sequence's keys through its rows: decode steps, and
prompt chunks in the batch-invariant mode), the kernel's tables with one query row per real token. The model's
forward hands it to every layer's attention (and to the fused decoder), which chooses its path from it; the
cache keeps only the storage (model_core.kv_cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class StepAttention:
    """One prepared forward of B rows of T tokens over a paged cache, whose queries see key positions 0..Tk-1 (at
    most) of their own sequences. N: the real (not padding) tokens, one query row each where `in_place`."""

    positions: torch.Tensor  # (B, T) the tokens' positions (padding tokens: clamped to Tk - 1)
    batch: int  # B
    tokens: int  # T
    num_keys: int  # Tk
    mask: torch.Tensor | None  # (B, 1, T, Tk) bool, True = attend; None = see is_causal
    is_causal: bool  # with mask None: causal (a prompt from position 0) or all keys visible
    in_place: bool  # the cache's kernel attends from its rows (`PagedKVCache.attend`), no gather
    write: torch.Tensor  # (B*T,) flat rows to write (padding: the scratch row); in place (N,), real tokens only
    read: torch.Tensor | None  # (B*Tk,) flat rows to gather, or None when read_range covers them
    read_range: tuple[int, int] | None  # (start row, Tk) for a single sequence stored contiguously
    rows: torch.Tensor | None = None  # in place: (B, Tk) (decode) or (N, Tk) flat row of every key position
    lens: torch.Tensor | None = None  # in place: (N,) int32 keys each query row sees
    index: torch.Tensor | None = None  # in place: (N,) which of the B*T tokens are real (None: all of them)

    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For a step served in place: (write rows (N,) int64, key rows (N, Tk) int64, keys per query row (N,)
        int32, Tk), one row per real token (see `real_tokens`)."""
        assert self.in_place and self.rows is not None and self.lens is not None
        return self.write, self.rows, self.lens, self.num_keys

    def real_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """For a step served in place: t (B, T, ...) -> (N, ...), the real tokens' rows in the order of
        `decode_tables` (padding only exists where chunks of different lengths share a forward)."""
        assert self.in_place
        flat = t.reshape(self.batch * self.tokens, *t.shape[2:])  # (B*T, ...)
        return flat if self.index is None else flat[self.index]

    def padded(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of `real_tokens`: rows (N, ...) -> (B, T, ...), zeros at padding tokens (into `out`, a
        (B*T, ...) buffer, where given)."""
        if self.index is not None:
            out = (
                torch.zeros(self.batch * self.tokens, *rows.shape[1:], dtype=rows.dtype) if out is None else out.zero_()
            )
            rows = out.index_copy_(0, self.index, rows)  # (B*T, ...)
        elif out is not None and out.data_ptr() != rows.data_ptr():
            rows = out.copy_(rows)
        return rows.view(self.batch, self.tokens, *rows.shape[1:])  # (B, T, ...)
