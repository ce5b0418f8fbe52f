"""Matmuls on GGUF weights kept as stored (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS, and F16/BF16),
for decode-sized batches.

A 135M-parameter model in Q4_1 is 97 MB; dequantized to bf16 it is 269 MB (fp32: 540 MB), and a
decode step with few rows reads every weight once, so it is bound by memory traffic. `QuantLinear`
keeps both forms: float32/bfloat16 batches of at most `max_rows` rows go to the native kernel of the
model's backend (model_core.native), which reads the blocks as stored and takes the product with the
file's exact weights (fp32 sums); bigger batches (prefill), autograd and other devices go to the dense
layer, where the BLAS matmul is faster. A layer loaded without dense weights (meta; loader's dense_weights) runs
those batches on its weights dequantized for the call by the kernels (`dequantize_into`: the same values).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from model_core import native
from model_core.native import Kernels

F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14  # GGML type ids
IQ4_NL, IQ4_XS, BF16 = 20, 23, 30
IQ4_VALUES = (
    -127,
    -104,
    -83,
    -65,
    -49,
    -35,
    -22,
    -10,
    1,
    13,
    25,
    38,
    53,
    69,
    89,
    113,
)  # IQ4's table (kernels/common.h)
ACT = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' activation dtypes (kernels/common.h)
_EXACT_ONLY: ContextVar[bool] = ContextVar("exact_only", default=False)
ALL_ROWS = 1 << 30  # max_rows of a layer that runs every batch on its kernel (the batch-invariant mode)


@dataclass(frozen=True)
class QuantKind:
    """A repacked form of weights the kernels read (kernels/common.h; QKIND_* of kernels/aigc_kernels.h)."""

    value: int  # the QKIND_* the kernels take
    name: str
    block: int  # weights per (super-)block: in_features is a multiple of it
    entry: str  # the kernel entry point (model_core.native.ENTRY_POINTS) that runs it
    int8: bool = True  # its int8 mode rounds activations to int8 (interleave()); float kinds: exact products always


KIND_Q4 = QuantKind(0, "4-bit", 32, "quant_matmul")  # Q4_0, Q4_1: nibbles, fp16 d and m per 32
KIND_Q8 = QuantKind(1, "8-bit", 32, "quant_matmul")  # Q8_0: int8, fp16 d per 32
KIND_Q4_K = QuantKind(2, "Q4_K", 256, "quant_matmul_kind")  # super-blocks of 256
KIND_Q6_K = QuantKind(3, "Q6_K", 256, "quant_matmul_kind")
KIND_Q5_0 = QuantKind(4, "Q5_0", 32, "quant_matmul_kind")  # 5-bit blocks of 32
KIND_Q5_1 = QuantKind(5, "Q5_1", 32, "quant_matmul_kind")
KIND_Q5_K = QuantKind(6, "Q5_K", 256, "quant_matmul_kind")
KIND_F16 = QuantKind(7, "F16", 32, "quant_matmul_kind", int8=False)  # float weights as stored: qs (N, K/32, 64)
KIND_BF16 = QuantKind(8, "BF16", 32, "quant_matmul_kind", int8=False)
KIND_IQ4 = QuantKind(9, "IQ4", 32, "quant_matmul_kind")  # IQ4_NL, IQ4_XS: table indices, an fp32 scale per 32
KIND_Q2_K = QuantKind(10, "Q2_K", 256, "quant_matmul_kind")  # 2-bit q, a 4-bit scale and min per 16
KIND_Q3_K = QuantKind(11, "Q3_K", 256, "quant_matmul_kind")  # 3-bit q, a 6-bit signed scale per 16
KINDS = {
    k.value: k
    for k in (
        KIND_Q4,
        KIND_Q8,
        KIND_Q4_K,
        KIND_Q6_K,
        KIND_Q5_0,
        KIND_Q5_1,
        KIND_Q5_K,
        KIND_F16,
        KIND_BF16,
        KIND_IQ4,
        KIND_Q2_K,
        KIND_Q3_K,
    )
}

# the float kinds run batches up to the ISA's wide_max_rows (they have no AMX tile path: dense bf16 was faster at 8
# and 16 rows); the block kinds up to max_rows (SmolLM2 steps at 16 rows on the tiles against dense bf16 on the AMX VM:
# Q8_0 630 against 575 tok/s, Q4_K_M 615 against 560, Q6_K 597 against 558; Qwen3-0.6B-shaped Q2_K, Q3_K_M equal)
FLOAT_KINDS = frozenset((KIND_F16, KIND_BF16))

_Repacked = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # qs, d, m


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block of b (N, nb, bytes) -> (N, nb) float16."""
    return b[:, :, at : at + 2].contiguous().view(torch.float16).squeeze(-1)


def _repack_q4_0(b: torch.Tensor) -> _Repacked:  # w = d (q - 8): m = -8 d, exact in fp16
    d = _half(b, 0)
    return b[:, :, 2:], d, d * -8


def _repack_q4_1(b: torch.Tensor) -> _Repacked:  # w = d q + m
    return b[:, :, 4:], _half(b, 0), _half(b, 2)


def _repack_q8_0(b: torch.Tensor) -> _Repacked:  # w = d q
    return b[:, :, 2:], _half(b, 0), None


def _nibbles_by_32(v: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..15 -> (..., 16) bytes in the 4-bit blocks' order (low nibble value i, high value 16 + i)."""
    return v[..., :16] | (v[..., 16:] << 4)


def _repack_q4_k(b: torch.Tensor) -> _Repacked:
    """144-byte Q4_K super-blocks (fp16 d, dmin; 12 bytes of 6-bit scales and mins; 128 of nibbles) -> qs (N, K/32, 16)
    in the 4-bit order, d (N, K/256, 2) fp32 [d, dmin], m (N, K/256, 16) uint8 [8 scales, 8 mins] (kernels/common.h)."""
    N, nb = b.shape[:2]
    sc = b[:, :, 4:16].reshape(N, nb, 3, 4)  # the layout of gguf.quants.Q4_K.get_scale_min
    lo, hi, both = sc[:, :, 0], sc[:, :, 1], sc[:, :, 2]
    scales = torch.cat([lo & 0x3F, (both & 0x0F) | ((lo >> 2) & 0x30)], -1)
    mins = torch.cat([hi & 0x3F, (both >> 4) | ((hi >> 2) & 0x30)], -1)
    q = b[:, :, 16:].reshape(N, nb, 4, 1, 32)  # run i: sub-blocks 2i (low nibbles) and 2i + 1 (high)
    q = torch.cat([q & 0x0F, q >> 4], 3).reshape(N, nb * 8, 32)
    d = torch.stack([_half(b, 0), _half(b, 2)], -1).float()
    return _nibbles_by_32(q), d, torch.cat([scales, mins], -1)


def _q5_by_32(v: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..31 -> (..., 20) bytes: the low 4 bits in the 4-bit blocks' order (_nibbles_by_32), then the
    fifth bits as a little-endian uint32 (bit i: weight i), as Q5_0/Q5_1 files hold them (kernels/common.h)."""
    bits = ((v >> 4) & 1).reshape(*v.shape[:-1], 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)
    return torch.cat([_nibbles_by_32(v & 0x0F), bits.sum(-1).to(torch.uint8)], -1)


def _repack_q5_0(b: torch.Tensor) -> _Repacked:
    """22-byte Q5_0 blocks (fp16 d, 4 bytes of fifth bits, 16 of nibbles) -> qs (N, K/32, 20): the nibbles, then the
    fifth bits; d (N, K/32) fp16; w = d (q - 16) (the kernels: fma(q, d, -16 d), exact)."""
    return torch.cat([b[:, :, 6:22], b[:, :, 2:6]], -1), _half(b, 0), None


def _repack_q5_1(b: torch.Tensor) -> _Repacked:
    """24-byte Q5_1 blocks (fp16 d, m, 4 bytes of fifth bits, 16 of nibbles) -> qs as Q5_0's, d and m (N, K/32) fp16:
    w = d q + m (d q exact, one rounding)."""
    return torch.cat([b[:, :, 8:24], b[:, :, 4:8]], -1), _half(b, 0), _half(b, 2)


def _repack_q5_k(b: torch.Tensor) -> _Repacked:
    """176-byte Q5_K super-blocks (fp16 d, dmin; 12 bytes of 6-bit scales and mins; 32 of fifth bits; 128 of nibbles)
    -> qs (N, K/32, 20) per sub-block as Q5_0's, d (N, K/256, 2) fp32 [d, dmin] and m (N, K/256, 16) uint8 as Q4_K's:
    w = (d sc_j) q - (dmin mn_j)."""
    N, nb = b.shape[:2]
    _, d, m = _repack_q4_k(torch.cat([b[:, :, :16], b[:, :, 48:176]], -1))  # the Q4_K fields, and their order
    ql = b[:, :, 48:].reshape(N, nb, 4, 1, 32)  # run i: sub-blocks 2i (low nibbles) and 2i + 1 (high), as Q4_K
    ql = torch.cat([ql & 0x0F, ql >> 4], 3).reshape(N, nb, 8, 32)
    qh = b[:, :, 16:48].reshape(N, nb, 1, 32)  # byte i: bit j of weight i of sub-block j
    qh = (qh >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
    return _q5_by_32((ql | (qh << 4)).reshape(N, nb * 8, 32)), d, m


def _repack_q6_k(b: torch.Tensor) -> _Repacked:
    """210-byte Q6_K super-blocks (128 bytes ql, 64 qh, 16 int8 scales, fp16 d) -> qs (N, K/32, 24): per 32 weights
    16 bytes of low nibbles in the 4-bit order and 8 of high bit pairs, d (N, K/256) fp32, m (N, K/256, 16) int8."""
    N, nb = b.shape[:2]
    ql = b[:, :, :128].reshape(N, nb, 2, 1, 64)  # as gguf.quants.Q6_K.dequantize_blocks
    ql = torch.cat([ql & 0x0F, ql >> 4], 3).reshape(N, nb * 8, 32)
    qh = b[:, :, 128:192].reshape(N, nb, 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], 3).reshape(N, nb * 8, 32)
    high = qh[..., 0:8] | (qh[..., 8:16] << 2) | (qh[..., 16:24] << 4) | (qh[..., 24:32] << 6)
    qs = torch.cat([_nibbles_by_32(ql), high], -1)
    return qs, _half(b, 208).float(), b[:, :, 192:208].contiguous().view(torch.int8)


def _q2_by_32(v: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..3 -> (..., 8) bytes (kernels/common.h): byte i bits 2s..2s+1 hold value 8s + i."""
    return v[..., 0:8] | (v[..., 8:16] << 2) | (v[..., 16:24] << 4) | (v[..., 24:32] << 6)


def _k_2bit(q: torch.Tensor) -> torch.Tensor:
    """The 64 bytes of 2-bit q of Q2_K/Q3_K super-blocks (N, nb, 64) -> (N, nb * 8, 32) values 0..3 by weight: weight
    128 h + 32 s + i is bits 2s..2s+1 of byte 32 h + i (as gguf.quants unpacks them)."""
    N, nb = q.shape[:2]
    low = q.reshape(N, nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
    return (low & 3).reshape(N, nb * 8, 32)


def _repack_q2_k(b: torch.Tensor) -> _Repacked:
    """84-byte Q2_K super-blocks (16 bytes of 4-bit scales and mins, 64 of 2-bit q, fp16 d, dmin) -> qs (N, K/32, 8),
    d (N, K/256, 2) fp32 [d, dmin], m (N, K/256, 16) uint8 the file's scale bytes: w = (d sc) q - (dmin mn) per 16."""
    d = torch.stack([_half(b, 80), _half(b, 82)], -1).float()
    return _q2_by_32(_k_2bit(b[:, :, 16:80])), d, b[:, :, :16]


def _repack_q3_k(b: torch.Tensor) -> _Repacked:
    """110-byte Q3_K super-blocks (32 bytes of high-bit masks, 64 of 2-bit lows, 12 of 6-bit scales, fp16 d) -> qs
    (N, K/32, 12): the 2-bit lows (_q2_by_32), then the third bits as a little-endian uint32; d (N, K/256) fp32,
    m (N, K/256, 16) int8 the signed scales: w = d sc (q - 4), q = low | third << 2 in 0..7 (gguf's q3 = low - 4
    (1 - high), as gguf.quants.Q3_K.dequantize_blocks unpacks them)."""
    N, nb = b.shape[:2]
    low = _k_2bit(b[:, :, 32:96])
    high = b[:, :, :32].reshape(N, nb, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
    high = (high & 1).reshape(N, nb * 8, 4, 8).to(torch.int32)  # weight 32 s + i: byte i, bit s
    third = (high << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)  # (N, nb * 8, 4)
    sc = b[:, :, 96:108]
    lo = torch.stack([sc[:, :, :8] & 0x0F, sc[:, :, :8] >> 4], 2).reshape(N, nb, 16)
    hi = (sc[:, :, 8:12].reshape(N, nb, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    scales = (lo | (hi.reshape(N, nb, 16) << 4)).to(torch.int16) - 32
    return torch.cat([_q2_by_32(low), third], -1), _half(b, 108).float(), scales.to(torch.int8)


def _repack_iq4_nl(b: torch.Tensor) -> _Repacked:
    """18-byte IQ4_NL blocks (fp16 d, 16 bytes of indices in the 4-bit order) -> qs (N, K/32, 16), d (N, K/32) fp32."""
    return b[:, :, 2:], _half(b, 0).float(), None


def _repack_iq4_xs(b: torch.Tensor) -> _Repacked:
    """136-byte IQ4_XS super-blocks (fp16 d, 2 bytes of high and 4 of low scale bits, 128 of indices) -> qs
    (N, K/32, 16) per sub-block of 32, d (N, K/32) fp32 = d (ls - 32) (exact: 11 + 6 bits), as gguf.quants.IQ4_XS
    unpacks them."""
    N, nb = b.shape[:2]
    high = b[:, :, 2:4].contiguous().view(torch.int16).to(torch.int32)  # (N, nb, 1): 2 bits per sub-block
    high = (high >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3  # (N, nb, 8)
    low = torch.stack([b[:, :, 4:8] & 0x0F, b[:, :, 4:8] >> 4], -1).reshape(N, nb, 8).to(torch.int32)
    ls = (low | (high << 4)) - 32
    d = _half(b, 0).float().unsqueeze(-1) * ls.float()  # (N, nb, 8)
    return b[:, :, 8:].reshape(N, nb * 8, 16), d.reshape(N, nb * 8), None


def _repack_float(b: torch.Tensor) -> _Repacked:
    """F16/BF16 rows as stored, (N, K/32, 64) bytes; no scales (an empty d: the kernels take NULL)."""
    return b, torch.empty(0, dtype=torch.uint8), None


@dataclass(frozen=True)
class GGMLType:
    """A GGUF tensor type the kernels run: its blocks in the file and how they are repacked for them."""

    name: str
    block: int  # weights per block
    nbytes: int  # bytes per block in the file
    kind: QuantKind  # the repacked form (and the kernel entry that runs it)
    repack: Callable[[torch.Tensor], _Repacked] = field(repr=False)  # (N, blocks, nbytes) uint8 -> qs, d, m


GGML_TYPES: dict[int, GGMLType] = {
    Q4_0: GGMLType("Q4_0", 32, 18, KIND_Q4, _repack_q4_0),
    Q4_1: GGMLType("Q4_1", 32, 20, KIND_Q4, _repack_q4_1),
    Q8_0: GGMLType("Q8_0", 32, 34, KIND_Q8, _repack_q8_0),
    Q4_K: GGMLType("Q4_K", 256, 144, KIND_Q4_K, _repack_q4_k),
    Q6_K: GGMLType("Q6_K", 256, 210, KIND_Q6_K, _repack_q6_k),
    Q5_0: GGMLType("Q5_0", 32, 22, KIND_Q5_0, _repack_q5_0),
    Q5_1: GGMLType("Q5_1", 32, 24, KIND_Q5_1, _repack_q5_1),
    Q5_K: GGMLType("Q5_K", 256, 176, KIND_Q5_K, _repack_q5_k),
    Q2_K: GGMLType("Q2_K", 256, 84, KIND_Q2_K, _repack_q2_k),
    Q3_K: GGMLType("Q3_K", 256, 110, KIND_Q3_K, _repack_q3_k),
    IQ4_NL: GGMLType("IQ4_NL", 32, 18, KIND_IQ4, _repack_iq4_nl),
    IQ4_XS: GGMLType("IQ4_XS", 256, 136, KIND_IQ4, _repack_iq4_xs),
    F16: GGMLType("F16", 32, 64, KIND_F16, _repack_float),  # rows of K a multiple of 32 (GGML's block is 1 value)
    BF16: GGMLType("BF16", 32, 64, KIND_BF16, _repack_float),
}


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
    Q4_K and Q6_K (super-blocks of 256): `qs` (N, K/32, 16 or 24), `d` float32 super-block scales, `m` the
    sub-block scales (kernels/common.h, k_qmatmul_kind; GGML_TYPES' repack functions make them).
    Q5_0, Q5_1 (blocks of 32) and Q5_K (super-blocks of 256, scales as Q4_K's): `qs` (N, K/32, 20), nibbles then
    fifth bits; Q5_0/Q5_1 `d` (and Q5_1 `m`) (N, K/32) float16. F16, BF16: `qs` (N, K/32, 64) the weights as
    stored, `d` empty, `m` None. IQ4 (IQ4_NL, IQ4_XS): `qs` (N, K/32, 16) table indices, `d` (N, K/32) float32.
    Q2_K, Q3_K (super-blocks of 256, a scale per 16): `qs` (N, K/32, 8 or 12) 2-bit q (Q3_K: then the third bits),
    `d` float32 (Q2_K: d and dmin), `m` (N, K/256, 16) the scale bytes (Q2_K: scale | min << 4; Q3_K: int8).
    `kind` says which form (KINDS); left out, it is the 4-bit form, or the 8-bit one where m is None.
    `interleave()` gives the form the int8 mode reads (groups of 8 rows; `rows` is then N): a weight in that
    form is multiplied with integer dot products by activations rounded to `x_bits` (8, or 16: two int8 halves) per
    block of 32, one in row form with exact products."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    rows: int | None = None  # out_features, when interleaved by 8 rows (the tensors are padded to a multiple of 8)
    kind: QuantKind = None  # type: ignore[assignment]  # set in __post_init__ where left out
    x_bits: int = 8  # interleaved: the bits per activation the products take (8, or 16 in two int8 halves)

    def __post_init__(self) -> None:
        if self.kind is None:  # the forms of before the K-quants, told apart by m
            object.__setattr__(self, "kind", KIND_Q8 if self.m is None else KIND_Q4)
        if self.x_bits not in (8, 16):
            raise ValueError(f"activations round to 8 or 16 bits, not {self.x_bits}")

    @property
    def interleaved(self) -> bool:
        return self.rows is not None

    def mode_bits(self) -> int:
        """The matmuls' mode bits (native.INT8, INT16) this weight's form takes."""
        return 0 if not self.interleaved else native.INT8 | (native.INT16 if self.x_bits == 16 else 0)

    @property
    def out_features(self) -> int:
        return int(self.qs.shape[0]) if self.rows is None else self.rows

    @property
    def in_features(self) -> int:
        return int(self.qs.shape[1]) * 32

    @property
    def nbytes(self) -> int:
        """The bytes the kernels read for the whole weight."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    @classmethod
    def from_ggml(cls, qtype: int, blocks: torch.Tensor) -> QuantWeight:
        """blocks: (N, row bytes) uint8, each row GGML blocks of `qtype` (one of GGML_TYPES)."""
        t = GGML_TYPES.get(qtype)
        if t is None:
            have = ", ".join(f"{v.name} = {k}" for k, v in GGML_TYPES.items())
            raise ValueError(f"GGML type {qtype} has no kernel ({have} do)")
        bs = t.nbytes
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % bs:
            raise ValueError(f"expected (rows, blocks * {bs}) uint8, got {tuple(blocks.shape)} {blocks.dtype}")
        qs, d, m = t.repack(blocks.reshape(blocks.shape[0], -1, bs))  # of (N, nb, bytes per block)
        return cls(qs.contiguous(), d.contiguous(), None if m is None else m.contiguous(), kind=t.kind)

    def interleave(self, x_bits: int = 8) -> QuantWeight:
        """Rows in groups of 8, each block's quants as 4-byte runs of the 8 rows side by side and the rows last in
        the scales (kernels/common.h): qs (G, K/32, bytes/4, 8, 4) of the row form's (N, K/32, bytes), d and m of
        (N, *s) as (G, *s, 8); zero rows pad the last group; multiplied by activations rounded to x_bits (8 or 16)
        per block. Float kinds have none (ValueError)."""
        if self.interleaved:
            return self if self.x_bits == x_bits else replace(self, x_bits=x_bits)
        if not self.kind.int8:
            raise ValueError(f"{self.kind.name} weights have no int8 mode: their products are exact in either mode")
        N, nb, nbytes = self.qs.shape
        G = -(-N // 8)

        def pad(t: torch.Tensor) -> torch.Tensor:  # (N, *s) -> (G, 8, *s), zero rows at the end
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, G * 8 - N)).view(G, 8, *t.shape[1:])

        def groups(t: torch.Tensor) -> torch.Tensor:  # (N, *s) -> (G, *s, 8)
            return pad(t).movedim(1, -1).contiguous()

        qs = pad(self.qs).view(G, 8, nb, nbytes // 4, 4).permute(0, 2, 3, 1, 4)  # (G, nb, k, 8, 4)
        m = None if self.m is None else groups(self.m)
        return QuantWeight(qs.contiguous(), groups(self.d), m, rows=N, kind=self.kind, x_bits=x_bits)

    def row_form(self) -> QuantWeight:
        """The inverse of `interleave()`."""
        if self.rows is None:
            return self
        G, nb, k = self.qs.shape[:3]

        def rows(t: torch.Tensor) -> torch.Tensor:  # (G, *s, 8) -> (N, *s)
            return t.movedim(-1, 1).reshape(G * 8, *t.shape[1:-1])[: self.rows].contiguous()

        qs = self.qs.permute(0, 3, 1, 2, 4).reshape(G * 8, nb, k * 4)[: self.rows]  # (N, nb, bytes)
        m = None if self.m is None else rows(self.m)
        return QuantWeight(qs.contiguous(), rows(self.d), m, kind=self.kind)

    def take_rows(self, rows: torch.Tensor) -> QuantWeight:
        """The weight's rows `rows` (int64 indices, in range) as a weight of their own, in row form (an embedding's
        lookup: dequantize_into them)."""
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.out_features):
            raise IndexError(f"row index out of range for a weight of {self.out_features} rows")
        if self.rows is None:
            d = self.d[rows] if self.d.numel() else self.d  # (float kinds: none)
            return QuantWeight(self.qs[rows], d, None if self.m is None else self.m[rows], kind=self.kind)
        g, r = rows // 8, rows % 8  # each row's group and place in it (the interleaved layout: interleave())
        G, nb, k = self.qs.shape[:3]
        qs = self.qs[g, :, :, r, :].reshape(len(rows), nb, k * 4)  # (n, nb, k, 4): the rows' bytes per block
        m = None if self.m is None else self.m[g, ..., r]  # (n, *s)
        return QuantWeight(qs, self.d[g, ..., r], m, kind=self.kind)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float32 weights."""
        if self.interleaved:
            return self.row_form().dequantize()
        N = self.out_features
        if self.kind == KIND_IQ4:  # w = d IQ4_VALUES[q]
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], -1).long()  # (N, nb, 32)
            v = torch.tensor(IQ4_VALUES, dtype=torch.float32)[q]
            return (self.d.unsqueeze(-1) * v).reshape(N, self.in_features)
        if not self.kind.int8:  # F16, BF16 as stored
            dt = torch.float16 if self.kind == KIND_F16 else torch.bfloat16
            return self.qs.reshape(N, -1).view(dt).float()
        if self.kind == KIND_Q4_K:  # w = (d sc) q - dmin mn, as gguf (both products exact)
            assert self.m is not None
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float().view(N, -1, 8, 32)
            sm = self.m.float()
            scale, mins = self.d[..., :1] * sm[..., :8], self.d[..., 1:] * sm[..., 8:]  # (N, K/256, 8)
            return (scale.unsqueeze(-1) * q - mins.unsqueeze(-1)).reshape(N, self.in_features)
        if self.kind in (KIND_Q5_0, KIND_Q5_1, KIND_Q5_K):  # 5-bit q: nibbles, then the fifth bits
            lo, h = self.qs[..., :16], self.qs[..., 16:].to(torch.int32)
            bits = (h.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1  # (N, nb, 4, 8): bit i = weight i
            q = (torch.cat([lo & 0x0F, lo >> 4], -1).to(torch.int32) | (bits.flatten(-2) << 4)).float()
            if self.kind == KIND_Q5_K:  # w = (d sc_j) q - dmin mn_j, as Q4_K
                assert self.m is not None
                sm = self.m.float()
                scale, mins = self.d[..., :1] * sm[..., :8], self.d[..., 1:] * sm[..., 8:]  # (N, K/256, 8)
                q = q.view(N, -1, 8, 32)
                return (scale.unsqueeze(-1) * q - mins.unsqueeze(-1)).reshape(N, self.in_features)
            d = self.d.float().unsqueeze(-1)
            if self.m is None:  # Q5_0: w = d (q - 16), exact
                return (d * (q - 16)).reshape(N, self.in_features)
            return (d * q + self.m.float().unsqueeze(-1)).reshape(N, self.in_features)  # Q5_1: d q exact, + m
        if self.kind in (KIND_Q2_K, KIND_Q3_K):  # per 16: Q2_K w = (d sc) q - dmin mn, Q3_K w = (d sc) (q - 4)
            assert self.m is not None
            h = self.qs[..., :8]
            q = torch.cat([h & 3, (h >> 2) & 3, (h >> 4) & 3, h >> 6], dim=-1).to(torch.int32)  # (N, nb, 32)
            if self.kind == KIND_Q2_K:
                sm = self.m.to(torch.int32)
                scale = self.d[..., :1] * (sm & 0x0F).float()  # (N, K/256, 16)
                mins = self.d[..., 1:] * (sm >> 4).float()
                return (scale.unsqueeze(-1) * q.float().view(N, -1, 16, 16) - mins.unsqueeze(-1)).reshape(N, -1)
            third = self.qs[..., 8:].to(torch.int32)  # (N, nb, 4): bit i of the uint32 = weight i
            bits = (third.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1  # (N, nb, 4, 8)
            q = (q | (bits.flatten(-2) << 2)) - 4
            scale = self.d.unsqueeze(-1) * self.m.float()  # (N, K/256, 16)
            return (scale.unsqueeze(-1) * q.float().view(N, -1, 16, 16)).reshape(N, self.in_features)
        if self.kind == KIND_Q6_K:  # w = (d sc) (q - 32), exact
            assert self.m is not None
            lo, h = self.qs[..., :16], self.qs[..., 16:]
            low = torch.cat([lo & 0x0F, lo >> 4], dim=-1)
            high = torch.cat([h & 3, (h >> 2) & 3, (h >> 4) & 3, h >> 6], dim=-1)
            q = ((low | (high << 4)).float() - 32).view(N, -1, 16, 16)
            scale = self.d.unsqueeze(-1) * self.m.float()  # (N, K/256, 16)
            return (scale.unsqueeze(-1) * q).reshape(N, self.in_features)
        if self.m is None:
            w = self.d.float().unsqueeze(-1) * self.qs.view(torch.int8).float()  # (N, nb, 32)
        else:
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()  # (N, nb, 32)
            w = self.d.float().unsqueeze(-1) * q + self.m.float().unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)


def qmatmul(
    x: torch.Tensor,
    w: QuantWeight,
    kernels: Kernels,
    bias: torch.Tensor | None = None,
    every_batch: bool = False,
) -> torch.Tensor:
    """x (..., in_features) float32 or bfloat16 on the CPU -> x @ W^T (+ bias, added in fp32), in x's dtype.
    An interleaved weight takes x rounded to int8 per block of 32 (integer dot products, as llama.cpp; builds
    that have them, see model_core.native); one in row form the exact products. every_batch: one method at every
    batch size, so that a row's result does not depend on its batch (the kernels may otherwise change method with
    the number of rows: the AVX512-BF16 build takes AMX tiles from a few rows)."""
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
    mode = w.mode_bits() | (native.EVERY_BATCH if every_batch else 0)
    if M and w.kind.entry == "quant_matmul_kind":  # the kind as a value (kernels/aigc_kernels.h QKIND_*)
        kernels.call(
            "quant_matmul_kind",
            x2.data_ptr(),
            ACT[x.dtype],
            w.kind.value,
            w.qs.data_ptr(),
            w.d.data_ptr(),
            None if w.m is None else w.m.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            M,
            N,
            K,
            mode,
            torch.get_num_threads(),
            context=f"qmatmul {w.kind.name} M={M} N={N} K={K}",
        )
    elif M:  # the addresses are taken here, at the call: nothing keeps them
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
            mode,
            torch.get_num_threads(),
            context=f"qmatmul M={M} N={N} K={K}",
        )
    return y.view(*x.shape[:-1], N)


def dequantize_into(w: QuantWeight, out: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """out (out_features, in_features) float32 or bfloat16, contiguous <- w's weights by the kernels: gguf's float32
    values (bf16: rounded to nearest even, as a dequantized copy cast to bf16). Returns out."""
    if out.dtype not in ACT or out.shape != (w.out_features, w.in_features) or not out.is_contiguous():
        raise ValueError(f"dequantize_into: a contiguous ({w.out_features}, {w.in_features}) fp32/bf16 tensor")
    rf = w.row_form()  # (the kernel reads the row form: an interleaved weight is regrouped, a copy of its bytes)
    kernels.call(
        "quant_dequantize",
        rf.kind.value,
        rf.qs.data_ptr(),
        rf.d.data_ptr(),
        None if rf.m is None else rf.m.data_ptr(),
        out.data_ptr(),
        rf.out_features,
        rf.in_features,
        ACT[out.dtype],
        torch.get_num_threads(),
        context=f"dequantize {rf.kind.name} N={rf.out_features} K={rf.in_features}",
    )
    return out


class QuantLinear(nn.Module):
    """A linear layer with a quantized copy of its weight: float32/bf16 CPU batches of at most `max_rows` rows
    use the kernel; larger ones, other dtypes, anything needing autograd and, for int8 mode, whatever runs under
    `exact_products()` the wrapped dense layer. The copy may come in parts stacked by rows, each of its own kind (a
    Q4_K_M file's QKV: q, k in Q4_K, v in Q6_K), each run by its kind's kernel into its columns of the output."""

    def __init__(
        self, dense: nn.Module, weight: QuantWeight | Sequence[QuantWeight], max_rows: int, kernels: Kernels
    ) -> None:
        super().__init__()
        parts = (weight,) if isinstance(weight, QuantWeight) else tuple(weight)
        dense_weight = getattr(dense, "weight", None)  # a Parameter, or a PackedLinear's plain tensor
        shape = (sum(w.out_features for w in parts), parts[0].in_features if parts else 0)
        if (
            not isinstance(dense_weight, torch.Tensor)
            or shape != tuple(dense_weight.shape)
            or any(w.in_features != shape[1] for w in parts)
        ):
            have = " + ".join(f"{w.out_features}x{w.in_features}" for w in parts)
            raise ValueError(
                f"quantized weight {have} does not match the layer {dense.out_features}x{dense.in_features}"
            )
        self.dense = dense
        self.parts = parts
        self.max_rows = max_rows
        self.kernels = kernels
        self.in_features, self.out_features = dense.in_features, dense.out_features

    @property
    def quant(self) -> QuantWeight:
        """The quantized weight, where it is one (ValueError where it comes in parts)."""
        if len(self.parts) != 1:
            raise ValueError(f"the weight is in {len(self.parts)} parts ({', '.join(w.kind.name for w in self.parts)})")
        return self.parts[0]

    @quant.setter
    def quant(self, weight: QuantWeight) -> None:
        self.parts = (weight,)

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

    @property
    def has_dense(self) -> bool:
        """Whether the wrapped layer holds dense weights; without (a model loaded with dense_weights off), the batches
        that would run on them run on the weights dequantized for the call instead (the same values)."""
        return not self.weight.is_meta

    def forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x), in float32 where the kernels' integer products take x (interleaved weights): x's values
        round to the same integers whatever its dtype, so the sums are forward's, only not rounded to x's dtype at
        the end (an LM head's logits: bf16 holds 25.3 and 25.4 as one value); else forward(x)."""
        if x.dtype == torch.bfloat16 and all(w.interleaved for w in self.parts) and not _EXACT_ONLY.get():
            if x.numel() // max(x.shape[-1], 1) <= self.max_rows:
                return self.forward(x.float())
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            rows > self.max_rows
            or x.requires_grad
            or x.dtype not in ACT
            or x.device.type != "cpu"
            or (_EXACT_ONLY.get() and any(w.interleaved for w in self.parts))
        ):
            return self.dense(x) if self.has_dense else _dense_layer_forward(self, x)
        bias, every = self.qbias, self.max_rows >= ALL_ROWS  # (every batch on the kernel: one method for all)
        if len(self.parts) == 1:
            return qmatmul(x, self.parts[0], self.kernels, bias, every)
        outs, at = [], 0
        for w in self.parts:
            outs.append(qmatmul(x, w, self.kernels, None if bias is None else bias[at : at + w.out_features], every))
            at += w.out_features
        return torch.cat(outs, dim=-1)


_SCRATCH = threading.local()  # per thread: the last dequantized weights' buffer, reused (see _dense_layer_forward)
_SCRATCH_KEEP = 256 << 20  # bytes: bigger buffers (an LM head over many rows) are not kept between calls


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least numel elements of dtype, this thread's (kept for the next call up to _SCRATCH_KEEP)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is not None and buf.dtype == dtype and buf.numel() >= numel:
        return buf[:numel]
    buf = torch.empty(numel, dtype=dtype)
    if numel * buf.element_size() <= _SCRATCH_KEEP:
        _SCRATCH.buf = buf
    return buf


def _dense_layer_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T (+ bias) with W the layer's weights dequantized into a scratch buffer by its kernels (each part into
    its rows): the dense layer's product (the same weights in x's dtype) for a layer that keeps none."""
    if x.requires_grad or x.dtype not in ACT or x.device.type != "cpu":
        raise ValueError(
            "this layer keeps only its quantized weights (dense weights off): it runs float32/bfloat16 CPU inference"
        )
    N, K = sum(part.out_features for part in layer.parts), layer.parts[0].in_features
    w = _scratch(N * K, x.dtype).view(N, K)
    at = 0
    for part in layer.parts:
        dequantize_into(part, w[at : at + part.out_features], layer.kernels)
        at += part.out_features
    bias = getattr(layer.dense, "bias", None)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def attach_quantized(
    model: nn.Module,
    weights: Mapping[str, QuantWeight | Sequence[QuantWeight]],
    max_rows: int,
    kernels: Kernels,
    x_bits: int | None = None,
) -> int:
    """Wrap each linear layer named in `weights` (module paths, e.g. 'blocks.0.attn.qkv'; a weight, or its parts
    stacked by rows) in a QuantLinear serving up to `max_rows` rows (at most the kernels' wide_max_rows where all of
    it is of a float kind and the layer has dense weights, unless ALL_ROWS), in the form the kernels' mode reads
    (interleaved for integer products with activations rounded to x_bits, 8 or 16 (None: the build's default, 8 where
    it rounds them, else the exact products of the row form); float weights stay as stored, their products exact);
    returns how many were wrapped."""
    if x_bits is not None and not kernels.isa.has_int8:
        raise ValueError(f"the {kernels.name} kernels have no integer products")
    bits = x_bits or (8 if kernels.isa.int8 else 0)
    for name, weight in weights.items():
        parts = [weight] if isinstance(weight, QuantWeight) else list(weight)
        parts = [w.interleave(bits) if bits and w.kind.int8 else w for w in parts]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, attr)
        # the float kinds' lower limit where the layer has dense weights to fall back on (a float part beside block
        # ones: the blocks' limit); without them a batch above the limit would dequantize the weights for the call
        wide = all(w.kind in FLOAT_KINDS for w in parts) and not dense.weight.is_meta
        rows = max_rows if not wide or max_rows >= ALL_ROWS else min(max_rows, kernels.isa.wide_max_rows)
        setattr(parent, attr, QuantLinear(dense, parts, rows, kernels))
    return len(weights)
