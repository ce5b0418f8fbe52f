"""Shared test helpers (not fixtures): tiny random LMs, GGML-quantized weights and the native kernel builds this
CPU runs.

Fixtures live in conftest.py files and may call these; test modules import them from here, never from
conftest.py or from another test module.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from model_core import native
from model_core.lm import CausalLM, LMConfig
from model_core.native import Kernels

if TYPE_CHECKING:
    from model_core.qmatmul import QuantWeight


@functools.cache
def kernels_for(isa: str) -> Kernels:
    return native.load(isa)


def native_isas(reference: bool = True) -> list[str]:
    """The native builds this CPU runs (each test parametrized over them runs them all)."""
    return [isa for isa in native.runnable() if reference or isa != "reference"]


def tiny_llama(vocab_size: int = 49152, seed: int = 0, max_seq_len: int = 256, **options: bool) -> CausalLM:
    """A 2-layer llama with GQA and random weights (scaled up so the logits are far from uniform). options: LMConfig
    block options of the llama variants, qkv_bias (Qwen 2) and qk_norm (Qwen 3), their biases ~ N(0, 0.5) and
    QK-norm weights ~ 1 + N(0, 0.3) (big enough to matter)."""
    torch.manual_seed(seed)
    cfg = LMConfig(
        "llama",
        vocab_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        max_seq_len=max_seq_len,
        rope_theta=10000.0,
        **options,
    )
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():  # (none without options: the plain model's draws are as before)
            if name.endswith("qkv.bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def tiny_llama_q4(
    max_rows: int, kernels: Kernels, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **options: bool
) -> CausalLM:
    """tiny_llama (with its block `options`) with its projections stored as GGUF Q4_1 blocks, served the way the
    loader serves a 4-bit GGUF on the CPU (the head too): dense copies for prompts, the 4-bit kernel for batches of
    at most `max_rows` rows, decode steps through the fused decoder."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from model_core.fused_decode import FusedLlamaDecoder
    from model_core.packing import pack_linears, packing_available
    from model_core.qmatmul import QuantWeight, attach_quantized

    model = tiny_llama(seed=seed, **options)
    q4 = gguf.GGMLQuantizationType.Q4_1
    blocks: dict[str, QuantWeight] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.startswith("blocks.") or name == "lm_head"):
                raw = quantize(mod.weight.numpy(), q4)
                mod.weight.copy_(torch.from_numpy(np.asarray(dequantize(raw, q4)).reshape(mod.weight.shape)))
                blocks[name] = QuantWeight.from_ggml(int(q4), torch.from_numpy(np.ascontiguousarray(raw)))
    model = model.to(dtype)
    if packing_available(dtype, torch.device("cpu")):
        pack_linears(model)
    attach_quantized(model, blocks, max_rows, kernels)
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    model.kernels = kernels
    return model


def quantized_weight(qtype: int, n: int, k: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A random (n, k) weight stored as GGML blocks of `qtype` (Q4_0, Q4_1 or Q8_0 of model_core.qmatmul), and what
    GGUF readers dequantize it to (float32)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from model_core.qmatmul import Q4_0, Q4_1, Q8_0, QuantWeight

    ggml = {
        Q4_0: gguf.GGMLQuantizationType.Q4_0,
        Q4_1: gguf.GGMLQuantizationType.Q4_1,
        Q8_0: gguf.GGMLQuantizationType.Q8_0,
    }[qtype]
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.2
    raw = quantize(w, ggml)
    ref = torch.from_numpy(np.asarray(dequantize(raw, ggml), dtype=np.float32).reshape(n, k))
    return QuantWeight.from_ggml(qtype, torch.from_numpy(np.ascontiguousarray(raw))), ref


def _by_16(x: np.ndarray, top: int, signed: bool) -> tuple[np.ndarray, ...]:
    """Super-blocks x (nb, 256) per 16 weights: a scale (signed: w = d sc q for q in -top-1..top; else w = d sc q - dmin
    mn for q in 0..top) with 4-bit (signed: 6-bit) integer scales and mins under fp16 d, dmin -> d, dmin, sc, mn, q."""
    sub = x.reshape(-1, 16, 16)
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
    scale = np.abs(sub).max(-1) / (top + 1) if signed else (hi - lo) / top
    mins = np.zeros_like(scale) if signed else -lo
    levels = 31 if signed else 15
    d, dmin = (scale.max(-1) / levels).astype(np.float16), (mins.max(-1) / levels).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -32 if signed else 0, levels)
    mn = np.clip(np.rint(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 15)
    step, off = df * sc, dminf * mn  # (nb, 16)
    q = np.rint(np.divide(sub + off[..., None], step[..., None], out=np.zeros_like(sub), where=step[..., None] != 0))
    q = np.clip(q, -top - 1 if signed else 0, top).astype(np.int16)
    return d, dmin, sc.astype(np.int16), mn.astype(np.uint8), q.reshape(-1, 256)


def _two_bit(q: np.ndarray) -> np.ndarray:
    """(nb, 256) values 0..3 -> the K-quants' 64 bytes: weight 128 h + 32 s + i at bits 2s..2s+1 of byte 32 h + i."""
    v = q.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def quantize_k(w: np.ndarray, qtype: int) -> np.ndarray:
    """(n, k) float32 weights (k a multiple of 256) as GGML Q2_K..Q6_K super-blocks (n, k/256 * bytes) uint8: a plain
    min/max quantizer (gguf's Python package has no quantizer for the K-quants; llama.cpp's picks better scales, the
    format is the same)."""
    from model_core.qmatmul import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

    n, k = w.shape
    x = w.astype(np.float32).reshape(n * k // 256, 256)
    nb = x.shape[0]
    if qtype == Q2_K:  # 16 bytes of sc | mn << 4, 64 of 2-bit q, fp16 d, dmin
        d, dmin, sc, mn, q = _by_16(x, 3, signed=False)
        head = (sc.astype(np.uint8) | (mn << 4)).astype(np.uint8)
        tail = np.stack([d, dmin], -1).view(np.uint8).reshape(nb, 4)
        out = np.concatenate([head, _two_bit(q), tail], -1)
    elif qtype == Q3_K:  # 32 bytes of high-bit masks, 64 of 2-bit lows, 12 of 6-bit scales (+ 32), fp16 d
        d, _, sc, _, q = _by_16(x, 3, signed=True)
        u = (q + 4).astype(np.uint8)  # 0..7: low = u & 3, high bit = u >> 2 (gguf's q3 = low - 4 (1 - high))
        hmask = ((u >> 2).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
        s6 = (sc + 32).astype(np.uint8)  # (nb, 16)
        low = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
        high = (s6 >> 4).reshape(nb, 4, 4)  # [k][t]: scale 4k + t's bits 4-5 at bits 2k of byte t
        high = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
        out = np.concatenate([hmask, _two_bit(u & 3), low, high, d.view(np.uint8).reshape(nb, 2)], -1)
    elif qtype in (Q4_K, Q5_K):
        top = 15 if qtype == Q4_K else 31
        sub = x.reshape(nb, 8, 32)
        lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)
        scale, mins = (hi - lo) / top, -lo  # per sub-block: w = scale q - min
        d = (scale.max(-1) / 63).astype(np.float16)
        dmin = (mins.max(-1) / 63).astype(np.float16)
        df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
        sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
        mn = np.clip(np.rint(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
        step, off = df * sc, dminf * mn  # (nb, 8)
        q = np.rint(np.divide(sub + off[..., None], step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0))
        q = np.clip(q, 0, top).astype(np.uint8)  # (nb, 8, 32)
        packed = np.concatenate(
            [
                (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
                (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
                (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
            ],
            -1,
        ).astype(np.uint8)
        low = q & 0x0F
        qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(nb, 128)  # run i: sub-blocks 2i (low) and 2i + 1 (high)
        head = np.stack([d, dmin], -1).view(np.uint8).reshape(nb, 4)
        if qtype == Q4_K:
            out = np.concatenate([head, packed, qs], -1)
        else:  # Q5_K: qh byte i holds bit 4 of weight i of sub-block j at bit j
            qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)  # (nb, 32)
            out = np.concatenate([head, packed, qh, qs], -1)
    elif qtype == Q6_K:
        sub = x.reshape(nb, 16, 16)
        scale = np.abs(sub).max(-1) / 32  # per 16 weights: w = scale (q - 32)
        d = (scale.max(-1) / 127).astype(np.float16)
        df = d.astype(np.float32)[:, None]
        sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), -128, 127).astype(np.int8)
        step = df * sc
        q = np.rint(np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] != 0))
        # weight 128 h + 32 p + t: ql byte 64 h + 32 (p % 2) + t, nibble p // 2; qh byte 32 h + t, bit pair p
        qv = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # [h][p][t]
        ql = (qv[:, :, 0:2] & 0x0F) | ((qv[:, :, 2:4] & 0x0F) << 4)  # (nb, 2, 2, 32)
        qh = (qv[:, :, 0] >> 4) | ((qv[:, :, 1] >> 4) << 2) | ((qv[:, :, 2] >> 4) << 4) | ((qv[:, :, 3] >> 4) << 6)
        out = np.concatenate(
            [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], -1
        )
    else:
        raise ValueError(f"no K-quant quantizer for GGML type {qtype}")
    return np.ascontiguousarray(out.astype(np.uint8).reshape(n, -1))


# the blocks' fp16 scales
_FP16_AT = {
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
}


def kquant_weight(
    qtype: int, n: int, k: int, seed: int, random_blocks: bool = False
) -> tuple[QuantWeight, torch.Tensor]:
    """A (n, k) weight of a K-quant (Q2_K..Q6_K), a 5-bit type (Q5_0, Q5_1), IQ4_NL/IQ4_XS or a float one (F16, BF16):
    random weights quantized (quantize_k, or gguf's quantizer), or with random_blocks (always for Q2_K, Q3_K and IQ4)
    every byte random but the fp16 scales (finite; float types: random weights as without); and what gguf dequantizes
    it to (float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from model_core.qmatmul import GGML_TYPES, QuantWeight

    t = GGML_TYPES[qtype]
    rng = np.random.default_rng(seed)
    nb = k // t.block
    if (random_blocks and t.kind.int8) or t.name in (
        "Q2_K",
        "Q3_K",
        "IQ4_NL",
        "IQ4_XS",
    ):  # (no quantizer here: random blocks only)
        b = rng.integers(0, 256, (n, nb, t.nbytes), dtype=np.uint8)
        for at in _FP16_AT[t.name]:
            h = (rng.standard_normal((n, nb)) * 0.02).astype(np.float16)
            b[:, :, at : at + 2] = h.view(np.uint8).reshape(n, nb, 2)
        raw = b.reshape(n, -1)
    elif t.block == 32:
        raw = quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.2, GGMLQuantizationType[t.name])
    else:
        raw = quantize_k(rng.standard_normal((n, k)).astype(np.float32) * 0.2, qtype)
    ref = np.asarray(dequantize(raw, GGMLQuantizationType[t.name]), dtype=np.float32).reshape(n, k)
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8)  # (F16 comes as float16 values)
    return QuantWeight.from_ggml(qtype, blocks), torch.from_numpy(ref)
