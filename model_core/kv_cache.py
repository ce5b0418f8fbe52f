"""A paged KV cache: one pool of fixed-size blocks per layer, shared by all sequences.

Storage per layer is (num_blocks * block_size, n_kv_heads, head_dim) for K and for V. A sequence
owns a block table (list of block ids, allocated by the scheduler); token position p of that
sequence lives at flat row block_table[p // block_size] * block_size + p % block_size.

Before each forward, `prepare()` takes the block tables and start positions of a batch of B
sequences each computing T new tokens and precomputes, once for all layers: where to write the new
K/V, which rows to gather back for attention and the attention mask (query at position p sees keys
at positions <= p of its own sequence). `update()` is what attention calls per layer.

Decode steps (one new token per sequence) on the CPU skip the gather when the cache is given native
kernels (the model's backend, model_core.backend): `attend()` runs a C kernel (kernels/attention.c)
that reads each sequence's keys and values in place through its rows. A cache made with
`in_place_prefill` serves prompt chunks the same way: every real token of the forward is one query row
of that kernel (its own position, write row and key count), so a token's attention is computed the same
way whatever chunk, batch or cache hit it came in (the batch-invariant mode, model_core.lm). The buffers
those steps work in (`scratch`: the cache's, so one per runner) are kept from step to step and grown for a
bigger batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model_core.native import Kernels


class Scratch:
    """Buffers a decode step works in, kept across layers and steps: `take(name, shape, dtype)` returns the same
    tensor for the same request until a bigger one for that name replaces the storage (grown, never shrunk).
    A buffer holds what its last user wrote: whoever takes it owns it until the next `take` of that name. Only
    the buffers' addresses at the time of a call go to the kernels."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}  # name -> flat storage
        self._views: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.allocations = 0  # how many times storage was allocated (for tests)

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is not None:
            return view
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        store = self._store.get(name)
        if store is None or store.numel() < nbytes:
            with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode alike
                store = torch.empty(max(nbytes, 64), dtype=torch.uint8)
            self._store[name] = store
            self._views = {k: v for k, v in self._views.items() if k[0] != name}  # they view the old storage
            self.allocations += 1
        with torch.inference_mode(False):
            view = store[:nbytes].view(dtype).view(shape)
        self._views[key] = view
        return view

    def nbytes(self, name: str) -> int:
        store = self._store.get(name)
        return 0 if store is None else store.numel()


class PagedKVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_positions: int | None = None,
        kernels: Kernels | None = None,
        in_place_prefill: bool = False,
    ) -> None:
        self.max_positions = max_positions  # the model's context length, when given
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device = torch.device(device)
        rows = num_blocks * block_size
        self.scratch_row = rows  # one extra row that padding tokens write to and nobody reads
        # K and V of a token side by side: (L, rows + 1, 2*nkv, hs); one copy writes both
        self.kv = torch.zeros(n_layers, rows + 1, 2 * n_kv_heads, head_dim, dtype=dtype, device=self.device)
        self._write: torch.Tensor | None = None  # (B*T,) flat rows to write
        self._read: torch.Tensor | None = None  # (B*Tk,) flat rows to gather, or None when contiguous
        self._read_range: tuple[int, int] | None = None  # (start row, Tk) for a single contiguous sequence
        self._shape: tuple[int, int, int] = (0, 0, 0)  # (B, T, Tk)
        self.mask: torch.Tensor | None = None  # (B, 1, T, Tk) bool, True = attend; None = see is_causal
        self.is_causal = False  # with mask None: causal (a prompt from position 0) or all keys visible
        self.attends_in_place = False  # this forward is a decode step `attend()` serves without a gather
        self._rows: torch.Tensor | None = None  # (B, Tk) flat row of every key position, for attend()
        self._lens: torch.Tensor | None = None  # (N,) int32 keys of each query row, for attend()
        self._index: torch.Tensor | None = None  # (N,) which of the B*T tokens are real (None: all of them)
        self.scratch = Scratch()  # decode steps' working buffers (attend(), model_core.fused_decode)
        self.kernels = (
            kernels
            if (
                self.device.type == "cpu"
                and dtype in (torch.float32, torch.bfloat16)
                and head_dim % 16 == 0
                and head_dim <= 256
            )
            else None
        )
        self.in_place_prefill = in_place_prefill and self.kernels is not None

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def prepare(
        self, block_tables: Sequence[Sequence[int]], starts: Sequence[int], num_tokens: int | Sequence[int]
    ) -> torch.Tensor:
        """Set up one forward of B sequences; row b computes num_tokens[b] tokens from starts[b].

        Rows shorter than the longest (T) are padded: their padding tokens are written to a scratch row
        nobody reads, and their outputs are to be ignored. Returns positions (B, T) for the forward.
        """
        B, bs = len(starts), self.block_size
        counts = [num_tokens] * B if isinstance(num_tokens, int) else list(num_tokens)
        T = max(counts)
        Tk = max(st + n for st, n in zip(starts, counts, strict=True))
        if self.max_positions is not None and Tk > self.max_positions:
            raise ValueError(f"position {Tk - 1} exceeds the context length {self.max_positions}")
        nblk = (Tk + bs - 1) // bs
        table = torch.zeros(B, nblk, dtype=torch.long)
        for b, bt in enumerate(block_tables):
            need = (starts[b] + counts[b] + bs - 1) // bs
            if len(bt) < need:
                raise ValueError(
                    f"block table of sequence {b} covers {len(bt) * bs} tokens, needs {starts[b] + counts[b]}"
                )
            table[b, :need] = torch.as_tensor(list(bt[:need]), dtype=torch.long)
        key_pos = torch.arange(Tk)  # (Tk,)
        rows = table[:, key_pos // bs] * bs + key_pos % bs  # (B, Tk) flat row of every key position
        start_t = torch.as_tensor(list(starts), dtype=torch.long).unsqueeze(1)  # (B, 1)
        positions = start_t + torch.arange(T)  # (B, T)
        write = rows.gather(1, positions.clamp(max=Tk - 1))  # (B, T)
        if min(counts) < T:  # padding tokens go to the scratch row
            pad = torch.arange(T).unsqueeze(0) >= torch.as_tensor(counts).unsqueeze(1)  # (B, T)
            write = write.masked_fill(pad, self.scratch_row)
            positions = positions.clamp(max=Tk - 1)
        self._write = write.reshape(-1).to(self.device)  # (B*T,)
        contiguous = B == 1 and bool((rows[0, 1:] - rows[0, :-1] == 1).all()) if Tk > 1 else B == 1
        if contiguous:
            self._read, self._read_range = None, (int(rows[0, 0]), Tk)
        else:
            self._read, self._read_range = rows.reshape(-1).to(self.device), None
        self._shape = (B, T, Tk)
        self.attends_in_place = self.kernels is not None and (T == 1 or self.in_place_prefill)
        if self.attends_in_place:  # one query row per real token: N = sum(counts) rows
            index = None
            if min(counts) < T:
                real = torch.arange(T).unsqueeze(0) < torch.as_tensor(counts).unsqueeze(1)  # (B, T)
                index = real.reshape(-1).nonzero().squeeze(1)  # (N,)
            self._index = index
            lens = (positions + 1).reshape(-1).to(torch.int32)  # (B*T,)
            if T == 1:
                self._rows = rows.contiguous()  # (B, Tk)
            else:  # each real token's sequence's rows (never the padded B*T x Tk)
                seq = torch.arange(B).repeat_interleave(T)  # (B*T,)
                self._rows = rows[seq if index is None else seq[index]]  # (N, Tk)
            if index is not None:
                lens, self._write = lens[index], self._write[index]
            self._lens = lens.contiguous()
            if T > 1:  # attention reads the tables above; no (B, 1, T, Tk) mask
                self.mask, self.is_causal = None, False
                return positions.to(self.device)
        if T == 1 and all(st + 1 == Tk for st in starts):  # decode of equal-length rows: every key is visible
            self.mask, self.is_causal = None, False
        elif B == 1 and starts[0] == 0:  # a whole prompt from its start: plain causal attention
            self.mask, self.is_causal = None, True
        else:
            mask = key_pos.view(1, 1, 1, Tk) <= positions.view(B, 1, T, 1)  # (B, 1, T, Tk)
            self.mask, self.is_causal = mask.to(self.device), False
        return positions.to(self.device)

    @property
    def num_keys(self) -> int:
        """Tk: the prepared forward's queries see key positions 0..Tk-1 of their sequences (at most)."""
        return self._shape[2]

    def update_fused(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv: (B, T, 2*nkv, hs) = this step's [K heads | V heads] -> all keys and values, each (B, nkv, Tk, hs)."""
        assert self._write is not None, "prepare() must be called before the forward"
        B, T, Tk = self._shape
        nkv = self.n_kv_heads
        store = self.kv[layer]  # (rows, 2*nkv, hs)
        store.index_copy_(0, self._write, kv.reshape(B * T, 2 * nkv, self.head_dim))
        if self._read_range is not None:
            s, n = self._read_range
            seen = store[s : s + n].unsqueeze(0)  # (1, Tk, 2*nkv, hs) view
        else:
            assert self._read is not None
            seen = store.index_select(0, self._read).view(B, Tk, 2 * nkv, self.head_dim)
        return seen[:, :, :nkv].transpose(1, 2), seen[:, :, nkv:].transpose(1, 2)  # (B, nkv, Tk, hs) each

    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For a forward served in place: (write rows (N,) int64, key rows (N, Tk) int64, keys per query row
        (N,) int32, Tk), one row per real token (see `real_tokens`)."""
        assert self.attends_in_place and self._write is not None and self._rows is not None and self._lens is not None
        return self._write, self._rows, self._lens, self._shape[2]

    def real_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """For a forward served in place: t (B, T, ...) -> (N, ...), the real tokens' rows in the order of
        `decode_tables` (padding only exists where chunks of different lengths share a forward)."""
        assert self.attends_in_place
        B, T, _ = self._shape
        flat = t.reshape(B * T, *t.shape[2:])  # (B*T, ...)
        return flat if self._index is None else flat[self._index]

    def padded(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of `real_tokens`: rows (N, ...) -> (B, T, ...), zeros at padding tokens (into `out`, a
        (B*T, ...) buffer, where given)."""
        B, T, _ = self._shape
        if self._index is not None:
            out = torch.zeros(B * T, *rows.shape[1:], dtype=rows.dtype) if out is None else out.zero_()
            rows = out.index_copy_(0, self._index, rows)
        elif out is not None and out.data_ptr() != rows.data_ptr():
            rows = out.copy_(rows)
        return rows.view(B, T, *rows.shape[1:])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        kv: torch.Tensor,
        scale: float | None = None,
        softcap: float | None = None,
        window: int = 0,
    ) -> torch.Tensor:
        """Store this forward's kv (B, T, 2*nkv, hs) and return softmax(q k^T * scale) v for each query row
        over the keys its token sees, for q (B, T, nh, hs) -> (B, T, nh, hs) (padding rows: zeros). Only when
        `attends_in_place`. scale: default 1/sqrt(hs); softcap: scores s -> softcap * tanh(s / softcap); window:
        each query sees only the last `window` of its keys (0: all). The result is a scratch buffer of the
        cache's, valid until the next attend() (the caller projects it)."""
        assert self.attends_in_place and self.kernels is not None and self._rows is not None and self._lens is not None
        assert self._write is not None
        B, T, Tk = self._shape
        nh, nkv, hs = q.shape[2], self.n_kv_heads, self.head_dim
        if q.dtype != self.kv.dtype or q.device != self.kv.device:
            raise ValueError(f"attend() takes {self.kv.dtype} queries like the cache's, not {q.dtype} on {q.device}")
        N = self._lens.shape[0]
        kv, q = self.real_tokens(kv), self.real_tokens(q)  # (N, 2*nkv, hs), (N, nh, hs)
        store = self.kv[layer]  # (rows, 2*nkv, hs)
        store.index_copy_(0, self._write, kv)
        if not q.is_contiguous():  # (a slice of the qkv projection): copied into scratch, not a new tensor
            q = self.scratch.take("attend.q", (N, nh, hs), q.dtype).copy_(q)
        out = self.scratch.take("attend.out", (B * T, nh, hs), q.dtype)
        rows = out if self._index is None else self.scratch.take("attend.rows", (N, nh, hs), q.dtype)
        self.kernels.call(
            "paged_attention_decode",
            q.data_ptr(),
            store.data_ptr(),
            self._rows.data_ptr(),
            self._lens.data_ptr(),
            rows.data_ptr(),
            N,
            nh,
            nkv,
            hs,
            Tk,
            1.0 / math.sqrt(hs) if scale is None else scale,
            softcap or 0.0,
            window,
            int(q.dtype == torch.bfloat16),
            torch.get_num_threads(),
            context=f"paged attention B={N} heads={nh}/{nkv} hs={hs} Tk={Tk}",
        )
        return self.padded(rows, out)  # (B, T, nh, hs)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, nkv, T, hs) for the prepared tokens -> all keys/values (B, nkv, Tk, hs)."""
        return self.update_fused(layer, torch.cat([k, v], dim=1).transpose(1, 2))  # (B, T, 2*nkv, hs)
