"""A paged KV cache: one pool of fixed-size blocks per layer, shared by all sequences.

Storage per layer is (num_blocks * block_size, n_kv_heads, head_dim) for K and for V. A sequence
owns a block table (list of block ids, allocated by the scheduler); token position p of that
sequence lives at flat row block_table[p // block_size] * block_size + p % block_size.

Before each forward, `prepare()` takes the block tables and start positions of a batch of B
sequences each computing T new tokens and precomputes, once for all layers: where to write the new
K/V, which rows to gather back for attention and the attention mask (query at position p sees keys
at positions <= p of its own sequence). It returns them as a value, a `StepAttention`
(model_core.step_attention), that the model's forward hands to each layer: the cache holds only the
storage. `update()` is what attention calls per layer with it.

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

from model_core.attention import KVStore
from model_core.huge_pages import advise_huge_pages
from model_core.native import Kernels
from model_core.step_attention import StepAttention


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


class PagedKVCache(KVStore):
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
        self.kv = torch.empty(n_layers, rows + 1, 2 * n_kv_heads, head_dim, dtype=dtype, device=self.device)
        advise_huge_pages(self.kv)  # (before the zeros touch it: decode reads it in scattered blocks)
        self.kv.zero_()
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
    ) -> StepAttention:
        """Set up one forward of B sequences; row b computes num_tokens[b] tokens from starts[b].

        Rows shorter than the longest (T) are padded: their padding tokens are written to a scratch row
        nobody reads, and their outputs are to be ignored. Returns the step's attention metadata, with the
        positions (B, T) for the forward.
        """
        B, bs = len(starts), self.block_size
        counts = [num_tokens] * B if isinstance(num_tokens, int) else list(num_tokens)
        T = max(counts)
        Tk = max(st + n for st, n in zip(starts, counts, strict=True))
        # (a request's room in the context was checked where it arrived; the tables past it do not exist)
        assert self.max_positions is None or Tk <= self.max_positions, (
            f"position {Tk - 1} exceeds the context length {self.max_positions}"
        )
        nblk = (Tk + bs - 1) // bs
        needs = [(st + n + bs - 1) // bs for st, n in zip(starts, counts, strict=True)]  # blocks each row reads
        for b, (bt, need) in enumerate(zip(block_tables, needs, strict=True)):
            if len(bt) < need:
                raise ValueError(
                    f"block table of sequence {b} covers {len(bt) * bs} tokens, needs {starts[b] + counts[b]}"
                )
        table = torch.tensor(  # (B, nblk), zeros past each row's blocks
            [[*bt[:need], *([0] * (nblk - need))] for bt, need in zip(block_tables, needs, strict=True)],
            dtype=torch.long,
        )
        key_pos = torch.arange(Tk)  # (Tk,)
        rows = table[:, key_pos // bs] * bs + key_pos % bs  # (B, Tk) flat row of every key position
        start_t = torch.as_tensor(list(starts), dtype=torch.long).unsqueeze(1)  # (B, 1)
        positions = start_t + torch.arange(T)  # (B, T)
        write = rows.gather(1, positions.clamp(max=Tk - 1))  # (B, T)
        if min(counts) < T:  # padding tokens go to the scratch row
            pad = torch.arange(T).unsqueeze(0) >= torch.as_tensor(counts).unsqueeze(1)  # (B, T)
            write = write.masked_fill(pad, self.scratch_row)
            positions = positions.clamp(max=Tk - 1)
        write_rows = write.reshape(-1).to(self.device)  # (B*T,)
        contiguous = B == 1 and bool((rows[0, 1:] - rows[0, :-1] == 1).all()) if Tk > 1 else B == 1
        read, read_range = (None, (int(rows[0, 0]), Tk)) if contiguous else (rows.reshape(-1).to(self.device), None)
        in_place = self.kernels is not None and (T == 1 or self.in_place_prefill)
        key_rows: torch.Tensor | None = None  # in place: (B, Tk) or (N, Tk)
        lens: torch.Tensor | None = None  # in place: (N,)
        index: torch.Tensor | None = None  # in place, with padding: (N,)
        if in_place:  # one query row per real token: N = sum(counts) rows
            if min(counts) < T:
                real = torch.arange(T).unsqueeze(0) < torch.as_tensor(counts).unsqueeze(1)  # (B, T)
                index = real.reshape(-1).nonzero().squeeze(1)  # (N,)
            lens = (positions + 1).reshape(-1).to(torch.int32)  # (B*T,)
            if T == 1:
                key_rows = rows.contiguous()  # (B, Tk)
            else:  # each real token's sequence's rows (never the padded B*T x Tk)
                seq = torch.arange(B).repeat_interleave(T)  # (B*T,)
                key_rows = rows[seq if index is None else seq[index]]  # (N, Tk)
            if index is not None:
                lens, write_rows = lens[index], write_rows[index]  # (N,) each
            lens = lens.contiguous()
        mask, is_causal = self._mask(positions, starts, Tk, in_place)
        return StepAttention(
            positions=positions.to(self.device),
            batch=B,
            tokens=T,
            num_keys=Tk,
            mask=mask,
            is_causal=is_causal,
            in_place=in_place,
            write=write_rows,
            read=read,
            read_range=read_range,
            rows=key_rows,
            lens=lens,
            index=index,
        )

    def _mask(
        self, positions: torch.Tensor, starts: Sequence[int], Tk: int, in_place: bool
    ) -> tuple[torch.Tensor | None, bool]:
        """(mask (B, 1, T, Tk) bool, True = attend, or None; is_causal) for queries at positions (B, T)."""
        B, T = positions.shape
        if in_place and T > 1:  # attention reads the kernel's tables; no (B, 1, T, Tk) mask
            return None, False
        if T == 1 and all(st + 1 == Tk for st in starts):  # decode of equal-length rows: every key is visible
            return None, False
        if B == 1 and starts[0] == 0:  # a whole prompt from its start: plain causal attention
            return None, True
        key_pos = torch.arange(Tk)  # (Tk,)
        return (key_pos.view(1, 1, 1, Tk) <= positions.view(B, 1, T, 1)).to(self.device), False  # (B, 1, T, Tk)

    def update(self, layer: int, kv: torch.Tensor, step: StepAttention | None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv: (B, T, 2*nkv, hs) = this step's [K heads | V heads] -> all keys and values, each (B, nkv, Tk, hs)."""
        assert step is not None, "prepare() makes the step a forward on a paged cache attends with"
        B, T, Tk = step.batch, step.tokens, step.num_keys
        nkv = self.n_kv_heads
        store = self.kv[layer]  # (rows, 2*nkv, hs)
        store.index_copy_(0, step.write, kv.reshape(B * T, 2 * nkv, self.head_dim))
        if step.read_range is not None:
            s, n = step.read_range
            seen = store[s : s + n].unsqueeze(0)  # (1, Tk, 2*nkv, hs) view
        else:
            assert step.read is not None
            seen = store.index_select(0, step.read).view(B, Tk, 2 * nkv, self.head_dim)  # (B, Tk, 2*nkv, hs)
        return seen[:, :, :nkv].transpose(1, 2), seen[:, :, nkv:].transpose(1, 2)  # (B, nkv, Tk, hs) each

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        kv: torch.Tensor,
        step: StepAttention,
        scale: float | None = None,
        softcap: float | None = None,
        window: int = 0,
    ) -> torch.Tensor:
        """Store this forward's kv (B, T, 2*nkv, hs) and return softmax(q k^T * scale) v for each query row
        over the keys its token sees, for q (B, T, nh, hs) -> (B, T, nh, hs) (padding rows: zeros). Only for a
        step `in_place`. scale: default 1/sqrt(hs); softcap: scores s -> softcap * tanh(s / softcap); window:
        each query sees only the last `window` of its keys (0: all). The result is a scratch buffer of the
        cache's, valid until the next attend() (the caller projects it)."""
        _, rows_t, lens, Tk = step.decode_tables()
        assert self.kernels is not None, "only a cache with kernels prepares steps in place"
        B, T = step.batch, step.tokens
        nh, nkv, hs = q.shape[2], self.n_kv_heads, self.head_dim
        if q.dtype != self.kv.dtype or q.device != self.kv.device:
            raise ValueError(f"attend() takes {self.kv.dtype} queries like the cache's, not {q.dtype} on {q.device}")
        N = lens.shape[0]
        kv, q = step.real_tokens(kv), step.real_tokens(q)  # (N, 2*nkv, hs), (N, nh, hs)
        store = self.kv[layer]  # (rows, 2*nkv, hs)
        store.index_copy_(0, step.write, kv)
        if not q.is_contiguous():  # (a slice of the qkv projection): copied into scratch, not a new tensor
            q = self.scratch.take("attend.q", (N, nh, hs), q.dtype).copy_(q)
        out = self.scratch.take("attend.out", (B * T, nh, hs), q.dtype)
        rows = out if step.index is None else self.scratch.take("attend.rows", (N, nh, hs), q.dtype)
        self.kernels.call(
            "paged_attention_decode",
            q.data_ptr(),
            store.data_ptr(),
            rows_t.data_ptr(),
            lens.data_ptr(),
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
        return step.padded(rows, out)  # (B, T, nh, hs)
