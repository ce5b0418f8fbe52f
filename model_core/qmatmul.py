"""Matmuls on GGUF-quantized weights kept quantized (Q4_0, Q4_1, Q8_0), for decode-sized batches.

A 135M-parameter model in Q4_1 is 97 MB; dequantized to bf16 it is 269 MB (fp32: 540 MB), and a
decode step with few rows reads every weight once, so it is bound by memory traffic. `QuantLinear`
keeps both forms: float32/bfloat16 batches of at most `max_rows` rows go to the native kernel of the
model's backend (model_core.native), which reads the blocks as stored and takes the product with the
file's exact weights (fp32 sums); bigger batches (prefill), autograd and other devices go to the dense
layer, where the BLAS matmul is faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from model_core.native import Kernels

Q4_0, Q4_1, Q8_0 = 2, 3, 8  # GGML type ids
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}  # bytes per block of 32 weights
ACT = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' activation dtypes (kernels/common.h)
_EXACT_ONLY: ContextVar[bool] = ContextVar("exact_only", default=False)
ALL_ROWS = 1 << 30  # max_rows of a layer that runs every batch on its kernel (the batch-invariant mode)


@contextmanager
def exact_products() -> Iterator[None]:
    """Within it, layers whose kernels would round activations to int8 run their dense copy instead: CausalLM
    runs prompt chunks so, so that prompt logits (the first token, prompt logprobs) stay exact."""
    token = _EXACT_ONLY.set(True)
    try:
        yield
    finally:
        _EXACT_ONLY.reset(token)


@dataclass(frozen=True)
class QuantWeight:
    """An (out_features, in_features) block-quantized weight, repacked for the kernels (see kernels/common.h):
    4-bit: nibbles `qs` (N, K/32, 16) uint8, `d` and `m` (N, K/32) float16 with w = d q + m;
    8-bit: `qs` (N, K/32, 32) holding int8 q, `d` (N, K/32) float16, `m` None, w = d q.
    `interleave()` gives the form the int8 mode reads (groups of 8 rows; `rows` is then N): a weight in that
    form is multiplied in int8 mode, one in row form with exact products."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    rows: int | None = None  # out_features, when interleaved by 8 rows (the tensors are padded to a multiple of 8)

    @property
    def interleaved(self) -> bool:
        return self.rows is not None

    @property
    def out_features(self) -> int:
        return int(self.qs.shape[0]) if self.rows is None else self.rows

    @property
    def in_features(self) -> int:
        return int(self.qs.shape[1]) * 32

    @classmethod
    def from_ggml(cls, qtype: int, blocks: torch.Tensor) -> QuantWeight:
        """blocks: (N, row bytes) uint8, each row K/32 GGML blocks of `qtype` (Q4_0, Q4_1 or Q8_0)."""
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"GGML type {qtype} has no kernel (Q4_0 = 2, Q4_1 = 3 and Q8_0 = 8 do)")
        bs = BLOCK_BYTES[qtype]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % bs:
            raise ValueError(f"expected (rows, blocks * {bs}) uint8, got {tuple(blocks.shape)} {blocks.dtype}")
        b = blocks.reshape(blocks.shape[0], -1, bs)  # (N, nb, bytes per block)

        def half(at: int) -> torch.Tensor:  # the fp16 at byte `at` of every block -> (N, nb)
            return b[:, :, at : at + 2].contiguous().view(torch.float16).squeeze(-1)

        d = half(0)
        if qtype == Q4_1:  # w = d q + m
            m, qs = half(2), b[:, :, 4:]
        elif qtype == Q4_0:  # w = d (q - 8): m = -8 d, exact in fp16
            m, qs = d * -8, b[:, :, 2:]
        else:  # Q8_0: w = d q
            m, qs = None, b[:, :, 2:]
        return cls(qs.contiguous(), d.contiguous(), None if m is None else m.contiguous())

    def interleave(self) -> QuantWeight:
        """Rows in groups of 8, each block's quants as 4-byte runs of the 8 rows side by side (kernels/common.h):
        qs (G, K/32, 4 or 8, 8, 4), d and m (G, K/32, 8), zero rows padding the last group."""
        if self.interleaved:
            return self
        N, nb, nbytes = self.qs.shape
        G = -(-N // 8)

        def groups(t: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (G, 8, ...), zero rows at the end
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, G * 8 - N)).view(G, 8, *t.shape[1:])

        qs = groups(self.qs).view(G, 8, nb, nbytes // 4, 4).permute(0, 2, 3, 1, 4)  # (G, nb, k, 8, 4)
        d = groups(self.d).permute(0, 2, 1)  # (G, nb, 8)
        m = None if self.m is None else groups(self.m).permute(0, 2, 1)
        return QuantWeight(qs.contiguous(), d.contiguous(), None if m is None else m.contiguous(), rows=N)

    def row_form(self) -> QuantWeight:
        """The inverse of `interleave()`."""
        if self.rows is None:
            return self
        G, nb, k = self.qs.shape[:3]
        qs = self.qs.permute(0, 3, 1, 2, 4).reshape(G * 8, nb, k * 4)[: self.rows]  # (N, nb, bytes)
        d = self.d.permute(0, 2, 1).reshape(G * 8, nb)[: self.rows]
        m = None if self.m is None else self.m.permute(0, 2, 1).reshape(G * 8, nb)[: self.rows]
        return QuantWeight(qs.contiguous(), d.contiguous(), None if m is None else m.contiguous())

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float32 weights."""
        if self.interleaved:
            return self.row_form().dequantize()
        if self.m is None:
            w = self.d.float().unsqueeze(-1) * self.qs.view(torch.int8).float()  # (N, nb, 32)
        else:
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()  # (N, nb, 32)
            w = self.d.float().unsqueeze(-1) * q + self.m.float().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)


def qmatmul(x: torch.Tensor, w: QuantWeight, kernels: Kernels, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in_features) float32 or bfloat16 on the CPU -> x @ W^T (+ bias, added in fp32), in x's dtype.
    An interleaved weight takes x rounded to int8 per block of 32 (integer dot products, as llama.cpp; builds
    that have them, see model_core.native); one in row form the exact products."""
    if w.interleaved and not kernels.isa.has_int8:
        raise ValueError(f"the {kernels.name} kernels have no int8 mode for interleaved weights")
    if x.dtype not in ACT or x.device.type != "cpu":
        raise ValueError(f"qmatmul takes float32 or bfloat16 CPU activations, not {x.dtype} on {x.device}")
    K, N = w.in_features, w.out_features
    if x.shape[-1] != K:
        raise ValueError(f"activations have {x.shape[-1]} features, the weight {K}")
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()  # (N,)
    if M:  # the addresses are taken here, at the call: nothing keeps them
        m = None if w.m is None else w.m.data_ptr()
        kernels.call(
            "quant_matmul",
            x2.data_ptr(),
            ACT[x.dtype],
            w.qs.data_ptr(),
            w.d.data_ptr(),
            m,
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            M,
            N,
            K,
            int(w.interleaved),
            torch.get_num_threads(),
            context=f"qmatmul M={M} N={N} K={K}",
        )
    return y.view(*x.shape[:-1], N)


class QuantLinear(nn.Module):
    """A linear layer with a quantized copy of its weight: float32/bf16 CPU batches of at most `max_rows` rows
    use the kernel; larger ones, other dtypes, anything needing autograd and, for int8 mode, whatever runs under
    `exact_products()` the wrapped dense layer."""

    quant: QuantWeight

    def __init__(self, dense: nn.Module, weight: QuantWeight, max_rows: int, kernels: Kernels) -> None:
        super().__init__()
        dense_weight = getattr(dense, "weight", None)  # a Parameter, or a PackedLinear's plain tensor
        if not isinstance(dense_weight, torch.Tensor) or (weight.out_features, weight.in_features) != tuple(
            dense_weight.shape
        ):
            raise ValueError(
                f"quantized weight {weight.out_features}x{weight.in_features} does not match the "
                f"layer {dense.out_features}x{dense.in_features}"
            )
        self.dense = dense
        self.quant = weight
        self.max_rows = max_rows
        self.kernels = kernels
        self.in_features, self.out_features = dense.in_features, dense.out_features

    @property
    def qbias(self) -> torch.Tensor | None:
        """The dense layer's bias as the kernel takes it (fp32), read at the call: it follows a moved, cast or
        replaced bias (a no-op view for an fp32 one)."""
        bias = getattr(self.dense, "bias", None)
        return None if bias is None else bias.detach().to(torch.float32).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        w = self.dense.weight
        assert isinstance(w, torch.Tensor)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            rows > self.max_rows
            or x.requires_grad
            or x.dtype not in ACT
            or x.device.type != "cpu"
            or (self.quant.interleaved and _EXACT_ONLY.get())
        ):
            return self.dense(x)
        return qmatmul(x, self.quant, self.kernels, self.qbias)


def attach_quantized(model: nn.Module, weights: dict[str, QuantWeight], max_rows: int, kernels: Kernels) -> int:
    """Wrap each linear layer named in `weights` (module paths, e.g. 'blocks.0.attn.qkv') in a QuantLinear
    serving up to `max_rows` rows (at most the kernels' limit for 8-bit weights, unless ALL_ROWS), in the form
    the kernels' mode reads (interleaved for int8 activations); returns how many were wrapped."""
    for name, w in weights.items():
        w = w.interleave() if kernels.isa.int8 else w
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rows = max_rows if w.m is not None or max_rows >= ALL_ROWS else min(max_rows, kernels.isa.q8_max_rows)
        setattr(parent, attr, QuantLinear(getattr(parent, attr), w, rows, kernels))
    return len(weights)
