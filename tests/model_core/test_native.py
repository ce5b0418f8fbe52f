"""The C kernels, every build this CPU runs (the plain-C reference, AVX2, AVX512-BF16; NEON under emulation in
test_native_neon.py), in float32 and bfloat16: the quantized matmul (GGUF Q4_0/Q4_1/Q8_0 blocks) against the
dequantized weights, decode attention from the paged cache against gather + attention, each SIMD build's
primitives against the reference build's, GGUF models with the kernels against the same models without
them, and how the backend is chosen (and refused) per CPU."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_core import native
from model_core.attention import scaled_dot_product_attention
from model_core.backend import select_backend
from model_core.kv_cache import PagedKVCache
from model_core.lm import CausalLM, Output
from model_core.qmatmul import Q4_0, Q4_1, Q8_0, QuantLinear, QuantWeight, qmatmul
from model_core.step_attention import StepAttention
from tests.utils import kernels_for, native_isas, quantized_weight

ISAS = native_isas()  # the reference build and every SIMD build this CPU executes
SIMD = native_isas(reference=False)
DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler: the native kernels cannot build here")


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
def test_repacked_weights_dequantize_like_gguf(qtype: int) -> None:
    qw, ref = quantized_weight(qtype, 48, 96, seed=qtype)
    assert torch.equal(qw.dequantize(), ref)


def _matmul_tolerance(ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 summation order (relative 1e-5 of the terms' scale), plus in bf16 the output's rounding (2^-9)."""
    order = 1e-5 * math.sqrt(x.shape[-1]) * (x.float().abs().max() * w.abs().max())
    return (2**-8 if dtype == torch.bfloat16 else 1e-6) * ref.abs() + order


def int8_blocks(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x (..., K) rounded to int8 (bits 16: 16-bit integers, 255 * 127 + 127 the largest) per block of 32 and back,
    as the kernels' integer modes do (kernels/common.h)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)  # (..., K/32, 32)
    scale = xb.abs().amax(-1, keepdim=True) / (127.0 if bits == 8 else 32512.0)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(xb * inv) * scale).reshape(x.shape)  # torch.round: nearest even, like the C


# (isa, bits of the activations in the integer products; 0: the exact products)
MODES = [(isa, bits) for isa in ISAS for bits in (0, 8, 16) if not bits or native.ISAS[isa].has_int8]


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
@pytest.mark.parametrize("n", [1, 8, 13, 40])
def test_interleaved_weights_are_the_same_weights(qtype: int, n: int) -> None:
    qw, ref = quantized_weight(qtype, n, 96, seed=n)
    inter = qw.interleave()
    assert inter.interleaved and inter.out_features == n and inter.in_features == 96
    assert inter.qs.shape[:2] == (-(-n // 8), 3) and inter.d.shape == (-(-n // 8), 3, 8)
    assert torch.equal(inter.dequantize(), ref)
    back = inter.row_form()
    assert torch.equal(back.qs, qw.qs) and torch.equal(back.d, qw.d)


@pytest.mark.parametrize("isa,bits", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=20, deadline=None)
@given(
    qtype=st.sampled_from([Q4_0, Q4_1, Q8_0]),
    m=st.integers(1, 19),
    n=st.integers(1, 70),
    nb=st.integers(1, 40),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qmatmul_is_the_product_with_the_files_weights(
    isa: str, dtype: torch.dtype, bits: int, qtype: int, m: int, n: int, nb: int, bias: bool, seed: int
) -> None:
    """Exact mode: the product of x with the file's exact weights. Integer modes: the same with x rounded to int8
    (or 16-bit integers) per block first (every build, whether it has integer dot products or not)."""
    qw, w = quantized_weight(qtype, n, 32 * nb, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 32 * nb, generator=g).to(dtype)
    x[:, :32] *= 0 if seed % 3 == 0 else 1  # a block of zeros (scale 0) now and then
    b = torch.randn(n, generator=g) if bias else None
    got = qmatmul(x, qw.interleave(bits) if bits else qw, kernels_for(isa), b)
    assert got.dtype == dtype
    ref = (int8_blocks(x, bits) if bits else x.float()) @ w.T + (0 if b is None else b)  # exact weights, float32
    err = (got.float() - ref).abs()
    assert (err <= _matmul_tolerance(ref, x, w, dtype)).all(), err.max()


def test_qmatmul_keeps_leading_dims_and_checks_arguments() -> None:
    kernels = kernels_for(ISAS[0])
    qw, w = quantized_weight(Q4_1, 8, 64, seed=3)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    assert qmatmul(x, qw, kernels).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="features"):
        qmatmul(torch.randn(1, 32).to(torch.bfloat16), qw, kernels)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        qmatmul(torch.randn(1, 64).half(), qw, kernels)
    with pytest.raises(ValueError, match="GGML type"):
        QuantWeight.from_ggml(16, torch.zeros(4, 66, dtype=torch.uint8))  # IQ2_XXS: no kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_linear_uses_the_kernel_only_for_small_batches(dtype: torch.dtype) -> None:
    kernels = kernels_for(ISAS[0])
    qw, w = quantized_weight(Q4_1, 16, 64, seed=4)
    dense = torch.nn.Linear(64, 16, bias=False)
    dense.weight.data = (w + 1.0).to(dtype)  # deliberately different: shows which path ran
    layer = QuantLinear(dense, qw, 4, kernels)
    with torch.inference_mode():
        small, big = torch.randn(4, 64).to(dtype), torch.randn(5, 64).to(dtype)
        assert torch.equal(layer(small), qmatmul(small, qw, kernels))
        assert torch.equal(layer(big), dense(big))
        half = torch.nn.Linear(64, 16, bias=False).half()
        x16 = torch.randn(2, 64).half()
        assert torch.equal(QuantLinear(half, qw, 4, kernels)(x16), half(x16))  # no kernel for fp16: dense


def _paged_case(
    dtype: torch.dtype, nh: int, nkv: int, hs: int, lens: list[int], seed: int, isa: str
) -> tuple[PagedKVCache, StepAttention, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bs = 4
    per_seq = max(lens) // bs + 1
    cache = PagedKVCache(2, per_seq * len(lens), bs, nkv, hs, dtype, kernels=kernels_for(isa))
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    perm = torch.randperm(per_seq * len(lens), generator=g).tolist()  # scattered blocks
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(len(lens))]
    step = cache.prepare(tables, [n - 1 for n in lens], 1)
    q = torch.randn(len(lens), 1, nh, hs, generator=g).to(dtype)
    kv = torch.randn(len(lens), 1, 2 * nkv, hs, generator=g).to(dtype)
    return cache, step, q, kv


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "nh,nkv,hs,lens", [(9, 3, 64, [1, 7, 33, 4, 30]), (4, 4, 16, [17]), (8, 2, 128, [2, 64, 65]), (2, 1, 32, [300, 1])]
)
def test_decode_attention_from_paged_rows_equals_gather_then_attention(
    isa: str, dtype: torch.dtype, nh: int, nkv: int, hs: int, lens: list[int]
) -> None:
    cache, step, q, kv = _paged_case(dtype, nh, nkv, hs, lens, seed=len(lens) + hs, isa=isa)
    assert step.in_place
    got = cache.attend(1, q, kv, step)  # (B, 1, nh, hs)
    k, v = cache.update(1, kv, step)  # the reference: gather the rows (the new K/V are already written)
    ref = scaled_dot_product_attention(q.transpose(1, 2).float(), k.float(), v.float(), mask=step.mask)
    err = (got.transpose(1, 2).float() - ref).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 2**-8 * max(ref.abs().max().item(), 1.0)), err


def test_attention_kernel_is_not_used_where_it_does_not_apply() -> None:
    kernels = kernels_for(ISAS[0])
    cache = PagedKVCache(1, 8, 4, 2, 8, torch.float32, kernels=kernels)  # head size 8: not a multiple of 16
    assert not cache.prepare([[0, 1]], [3], 1).in_place
    cache = PagedKVCache(1, 8, 4, 2, 16, torch.float32)  # no kernels given: the PyTorch path
    assert not cache.prepare([[0, 1]], [3], 1).in_place
    cache = PagedKVCache(1, 8, 4, 2, 16, torch.float32, kernels=kernels)
    assert not cache.prepare([[0, 1]], [0], 3).in_place  # a prompt chunk, not a decode step
    assert cache.prepare([[0, 1]], [3], 1).in_place


def _attention_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    softcap: float,
    window: int,
) -> torch.Tensor:
    """softmax(scale q K^T, soft-capped, window-masked) V in float64 for q (B, nh, hs) over the paged layer kv
    (R, 2 nkv, hs) through rows (B, Tk), lens (B,) keys each: every key scored, those before the window masked."""
    B, nh, hs = q.shape
    nkv = kv.shape[1] // 2
    out = torch.empty(B, nh, hs, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        keys = kv[rows[b, :n]].double()  # (n, 2 nkv, hs)
        k = keys[:, :nkv].repeat_interleave(nh // nkv, 1)  # (n, nh, hs): query head h reads kv head h // (nh/nkv)
        v = keys[:, nkv:].repeat_interleave(nh // nkv, 1)
        s = scale * torch.einsum("hd,nhd->hn", q[b].double(), k)  # (nh, n)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if window:
            s[:, : max(n - window, 0)] = -math.inf
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


def _paged_layout(lens: list[int], bs: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Each sequence's keys in blocks of bs rows, its blocks scattered over the cache (disjoint): the (B, Tk) row
    table (key position t of sequence b at row table[t // bs] * bs + t % bs) and the cache's number of rows."""
    per_seq = -(-max(lens) // bs)
    blocks = torch.randperm(per_seq * len(lens), generator=g).view(len(lens), per_seq)
    t = torch.arange(per_seq * bs)
    rows = blocks[:, t // bs] * bs + t % bs  # (B, per_seq * bs)
    return rows[:, : max(lens)].contiguous(), per_seq * len(lens) * bs


def _attention_tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: summation order and expf/tanhf (relative 1e-5 of the output's scale); bf16: plus the output's rounding
    (2^-9 relative) and the queries' in the SIMD builds' fp32 path."""
    return (2**-8 if dtype == torch.bfloat16 else 1e-5) * max(ref.abs().max().item(), 1.0)


# Windows: 0 (none), one key, shorter than a block, a block, across block boundaries, and as long as or longer than
# the longest row. Softcaps: none, tight (scores of up to ~20 squashed into +-5), Gemma 2's 50. Scales: the usual
# 1/sqrt(hs) and another (Gemma: query_pre_attn_scalar^-1/2).
WINDOWS = [0, 1, 3, 4, 5, 17, 40, 299, 300, 301, 4096]
SOFTCAPS = [0.0, 5.0, 50.0]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "nh,nkv,hs,lens,bs",
    [(8, 2, 64, [1, 7, 33, 300, 4, 40], 4), (4, 4, 128, [65, 18, 2], 16), (6, 2, 80, [41, 300], 16)],
)
def test_paged_attention_with_scale_softcap_and_window_equals_the_masked_reference(
    isa: str, dtype: torch.dtype, nh: int, nkv: int, hs: int, lens: list[int], bs: int
) -> None:
    """paged_attention_decode's scale, softcap and window against PyTorch (every key scored, soft-capped, those
    before the window masked), windows shorter and longer than the rows and starting inside blocks of the paged
    layout. The keys and values before each row's window are NaN in the kernel's cache: a kernel that read them (even
    to mask them) would return NaN."""
    g = torch.Generator().manual_seed(hs + len(lens))
    kernels = kernels_for(isa)
    rows, R = _paged_layout(lens, bs, g)
    B, Tk, act = len(lens), rows.shape[1], int(dtype == torch.bfloat16)
    kv = torch.randn(R, 2 * nkv, hs, generator=g).to(dtype)
    q = (torch.randn(B, nh, hs, generator=g) * 2).to(dtype)  # scores up to ~20: the tight softcap bites
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = torch.empty(B, nh, hs, dtype=dtype)
    for window in WINDOWS:
        poisoned = kv.clone()
        for b, n in enumerate(lens):
            poisoned[rows[b, : max(n - window, 0) if window else 0]] = math.nan
        for softcap in SOFTCAPS:
            for scale in (hs**-0.5, 0.3):
                out.fill_(math.nan)
                kernels.call(
                    "paged_attention_decode",
                    q.data_ptr(),
                    poisoned.data_ptr(),
                    rows.data_ptr(),
                    lens_t.data_ptr(),
                    out.data_ptr(),
                    B,
                    nh,
                    nkv,
                    hs,
                    Tk,
                    scale,
                    softcap,
                    window,
                    act,
                    2,
                )
                ref = _attention_reference(q, kv, rows, lens_t, scale, softcap, window)
                err = (out.double() - ref).abs().max().item()
                what = f"{isa} {dtype} window={window} softcap={softcap} scale={scale:.4f}"
                assert err <= _attention_tolerance(ref, dtype), f"{what}: max |diff| {err}"
    capped = _attention_reference(q, kv, rows, lens_t, 0.3, 5.0, 0)
    assert (capped - _attention_reference(q, kv, rows, lens_t, 0.3, 0.0, 0)).abs().max() > 0.1  # the cap bites


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sequences_attention_is_the_same_alone_in_any_batch_and_on_any_threads(isa: str, dtype: torch.dtype) -> None:
    """The kernel splits a few sequences' keys between threads in chunks and gives many sequences a thread each:
    either way a sequence's output is the same bit for bit (batch invariance), alone or among others, on 1 to 3
    threads, with rows of one key up to several chunks of keys, windowed or not."""
    g = torch.Generator().manual_seed(7)
    kernels = kernels_for(isa)
    nh, nkv, hs = 8, 2, 64
    lens = [1, 63, 64, 65, 200, 129, 17, 300]
    rows, R = _paged_layout(lens, 16, g)
    kv = torch.randn(R, 2 * nkv, hs, generator=g).to(dtype)
    q = torch.randn(len(lens), nh, hs, generator=g).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)

    def attend(pick: list[int], window: int, threads: int) -> torch.Tensor:
        qb, rb, lb = q[pick].contiguous(), rows[pick].contiguous(), lens_t[pick].contiguous()
        out = torch.full((len(pick), nh, hs), math.nan, dtype=dtype)
        args = (qb, kv, rb, lb, out)
        kernels.call("paged_attention_decode", *(t.data_ptr() for t in args), len(pick), nh, nkv, hs,
                     rows.shape[1], hs**-0.5, 0.0, window, int(dtype == torch.bfloat16), threads)  # fmt: skip
        return out

    for window in (0, 70):
        together = attend(list(range(len(lens))), window, 2)
        for b in range(len(lens)):
            for threads in (1, 2, 3):
                assert torch.equal(attend([b], window, threads), together[b : b + 1]), (b, window, threads)
        assert torch.equal(attend([4, 7], window, 2), together[[4, 7]])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_attention_takes_scale_softcap_and_window(isa: str, dtype: torch.dtype) -> None:
    """llama_attention (rope, cache write, attention): its output is the reference attention of its rotated query
    over the cache it updated, with the scale, softcap and window given, and bit for bit paged_attention_decode's
    on the same query and cache."""
    g = torch.Generator().manual_seed(11)
    kernels = kernels_for(isa)
    nh, nkv, hs, bs, lens = 4, 2, 64, 16, [50, 1, 17, 33]
    B, act = len(lens), int(dtype == torch.bfloat16)
    rows, R = _paged_layout(lens, bs, g)
    Tk, lens_t = rows.shape[1], torch.tensor(lens, dtype=torch.int32)
    write = rows[torch.arange(B), lens_t.long() - 1].contiguous()  # the new token is each row's last key
    ang = torch.rand(B, hs // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)
    for window, softcap, scale in [
        (0, 0.0, hs**-0.5),
        (16, 0.0, hs**-0.5),
        (5, 8.0, 0.25),
        (20, 50.0, 0.1),
        (64, 3.0, 0.2),
    ]:
        qkv = (torch.randn(B, (nh + 2 * nkv) * hs, generator=g) * 2).to(dtype)
        kv = torch.randn(R, 2 * nkv, hs, generator=g).to(dtype)
        att, again = torch.empty(B, nh * hs, dtype=dtype), torch.empty(B, nh, hs, dtype=dtype)
        ptrs = [t.data_ptr() for t in (cos, sin, kv, write, rows, lens_t, att)]
        kernels.call(
            "llama_attention",
            qkv.data_ptr(),
            B,
            1e-6,
            None,
            None,
            *ptrs,
            Tk,
            nh,
            nkv,
            hs,
            scale,
            softcap,
            window,
            act,
            2,
            None,
            0,
        )
        q = qkv[:, : nh * hs].reshape(B, nh, hs).contiguous()  # rotated in place
        assert torch.equal(kv[write].flatten(1), qkv[:, nh * hs :])  # the rotated k and the v, stored
        kernels.call(
            "paged_attention_decode",
            *[t.data_ptr() for t in (q, kv, rows, lens_t, again)],
            B,
            nh,
            nkv,
            hs,
            Tk,
            scale,
            softcap,
            window,
            act,
            2,
        )
        assert torch.equal(att.view(B, nh, hs), again)
        ref = _attention_reference(q, kv, rows, lens_t, scale, softcap, window)
        err = (att.view(B, nh, hs).double() - ref).abs().max().item()
        assert err <= _attention_tolerance(ref, dtype), f"window={window} softcap={softcap} scale={scale}: {err}"


@pytest.mark.parametrize("isa", ISAS)
def test_attention_parameters_out_of_range_are_refused(isa: str) -> None:
    kernels = kernels_for(isa)
    q, kv, out = torch.zeros(1, 2, 16), torch.zeros(8, 2, 16), torch.zeros(1, 2, 16)
    rows, lens = torch.arange(4).view(1, 4), torch.tensor([3], dtype=torch.int32)
    ptrs = (q.data_ptr(), kv.data_ptr(), rows.data_ptr(), lens.data_ptr(), out.data_ptr())
    assert kernels.call("paged_attention_decode", *ptrs, 1, 2, 1, 16, 4, 0.25, 0.0, 0, 0, 1) == 0
    for softcap, window in [(-1.0, 0), (math.nan, 0), (math.inf, 0), (-math.inf, 2), (0.0, -1), (5.0, -3)]:
        with pytest.raises(native.KernelError, match="paged_attention_decode .*AIGC_ERR_ARGS"):
            kernels.call("paged_attention_decode", *ptrs, 1, 2, 1, 16, 4, 0.25, softcap, window, 0, 1)


def _primitive_calls(kernels: native.Kernels, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Every entry point of a build on the same random inputs; returns what each wrote, by name."""
    g = torch.Generator().manual_seed(seed)
    act, call = int(dtype == torch.bfloat16), kernels.call
    B, C, F, nh, nkv, hs, Tk = 3, 96, 160, 4, 2, 32, 9

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    x, w, y = rnd(B, C), rnd(C), rnd(B, C)
    out: dict[str, torch.Tensor] = {}
    out["rmsnorm"] = torch.empty(B, C, dtype=dtype)
    call("llama_rmsnorm", x.data_ptr(), w.data_ptr(), 1e-5, out["rmsnorm"].data_ptr(), B, C, act)
    out["add"], out["add_rmsnorm"] = x.clone(), torch.empty(B, C, dtype=dtype)
    call(
        "llama_add_rmsnorm",
        out["add"].data_ptr(),
        y.data_ptr(),
        w.data_ptr(),
        1e-5,
        out["add_rmsnorm"].data_ptr(),
        B,
        C,
        act,
    )
    gu, out["swiglu"], out["geglu_tanh"] = (
        rnd(B, 2 * F) * 4,
        torch.empty(B, F, dtype=dtype),
        torch.empty(B, F, dtype=dtype),
    )
    call("llama_swiglu", gu.data_ptr(), out["swiglu"].data_ptr(), B, F, 0, act)
    call("llama_swiglu", gu.data_ptr(), out["geglu_tanh"].data_ptr(), B, F, 1, act)
    qkv = rnd(B, (nh + 2 * nkv) * hs)
    ang = torch.rand(B, hs // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)  # (B, hs) fp32
    kv = rnd(B * Tk + 1, 2 * nkv, hs)
    rows = torch.stack([torch.randperm(B * Tk, generator=g)[:Tk] for _ in range(B)])  # (B, Tk) int64
    write = rows[torch.arange(B), torch.tensor([Tk - 1, 4, 0])].contiguous()
    lens = torch.tensor([Tk, 5, 1], dtype=torch.int32)
    att = torch.empty(B, nh * hs, dtype=dtype)
    call(
        "llama_attention",
        qkv.data_ptr(),
        B,
        1e-6,
        None,
        None,
        cos.data_ptr(),
        sin.data_ptr(),
        kv.data_ptr(),
        write.data_ptr(),
        rows.data_ptr(),
        lens.data_ptr(),
        att.data_ptr(),
        Tk,
        nh,
        nkv,
        hs,
        hs**-0.5,
        0.0,
        0,
        act,
        2,
        None,
        0,
    )
    out.update(rope=qkv, kv_cache=kv, attention=att)
    # again with Gemma-style attention: another scale, soft-capped scores, a window shorter than two of the rows
    qkv2, kv2 = rnd(B, (nh + 2 * nkv) * hs) * 2, rnd(B * Tk + 1, 2 * nkv, hs)
    out["attention_capped_windowed"] = torch.empty(B, nh * hs, dtype=dtype)
    ptrs = (cos.data_ptr(), sin.data_ptr(), kv2.data_ptr(), write.data_ptr(), rows.data_ptr(), lens.data_ptr())
    att2 = out["attention_capped_windowed"].data_ptr()
    call(
        "llama_attention",
        qkv2.data_ptr(),
        B,
        1e-6,
        None,
        None,
        *ptrs,
        att2,
        Tk,
        nh,
        nkv,
        hs,
        0.3,
        4.0,
        3,
        act,
        2,
        None,
        0,
    )
    # and with QK-norm (Qwen 3): each q and k head RMSNorm'd (weights of its own) before the rotation
    qkv3, kv3, q_norm, k_norm = rnd(B, (nh + 2 * nkv) * hs) * 3, rnd(B * Tk + 1, 2 * nkv, hs), rnd(hs), rnd(hs)
    out["attention_qk_norm"] = torch.empty(B, nh * hs, dtype=dtype)
    ptrs = (cos.data_ptr(), sin.data_ptr(), kv3.data_ptr(), write.data_ptr(), rows.data_ptr(), lens.data_ptr())
    norms = (q_norm.data_ptr(), k_norm.data_ptr())
    att3 = out["attention_qk_norm"].data_ptr()
    call(
        "llama_attention",
        qkv3.data_ptr(),
        B,
        1e-6,
        *norms,
        *ptrs,
        att3,
        Tk,
        nh,
        nkv,
        hs,
        hs**-0.5,
        0.0,
        0,
        act,
        2,
        None,
        0,
    )
    out.update(rope_qk_norm=qkv3, kv_cache_qk_norm=kv3)
    for qtype in (Q4_0, Q4_1, Q8_0):
        qw, _ = quantized_weight(qtype, 43, C, seed + qtype)
        xs, bias = rnd(7, C), torch.randn(43, generator=g)
        out[f"qmatmul_{qtype}"] = qmatmul(xs, qw, kernels, bias)
        if kernels.isa.has_int8:
            out[f"qmatmul_int8_{qtype}"] = qmatmul(xs, qw.interleave(), kernels, bias)
    return out


@pytest.mark.parametrize("isa", SIMD)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_simd_build_computes_what_the_reference_build_computes(isa: str, dtype: torch.dtype) -> None:
    """Norms, residual add, SwiGLU, RoPE + cache write + attention, and the matmuls of the three block types:
    the SIMD build against the plain-C one, element by element (fp32: summation order; bf16: plus a rounding).
    The int8 mode's matmuls sum in the same order in every build: they agree bit for bit."""
    for seed in range(3):
        ref = _primitive_calls(kernels_for("reference"), dtype, seed)
        got = _primitive_calls(kernels_for(isa), dtype, seed)
        assert set(got) == {k for k in ref if native.ISAS[isa].has_int8 or "int8" not in k}
        for name, a in got.items():
            b = ref[name]
            if "int8" in name:
                assert torch.equal(a, b), f"{name} of {isa} ({dtype}) differs from the reference build's"
                continue
            scale = b.float().abs().max().item()
            tol = (2**-7 if dtype == torch.bfloat16 else 2e-6) * max(scale, 1.0)
            err = (a.float() - b.float()).abs().max().item()
            assert err <= tol, f"{name} of {isa} ({dtype}): max |diff| {err} > {tol}"


def _tiny_gguf(kind: str, qtype: str, tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    from tests.model_core.tiny_formats import tiny_hf_gpt2, tiny_hf_llama, tiny_vocab, write_gguf

    hf = tiny_hf_llama(n_kv_heads=2, seed=1) if kind == "llama" else tiny_hf_gpt2(seed=4)
    return write_gguf(hf, tmp_path / "m.gguf", qtype, vocab=tiny_vocab()).path


def _decode_logits(model: CausalLM, dtype: torch.dtype, kernels: native.Kernels | None) -> torch.Tensor:
    """Prefill 3 prompts one by one, then 6 batched decode steps of the 3 rows (fixed tokens).
    Returns the 3 + 18 logits rows, float32."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 11, 3)]
    steps = torch.randint(0, cfg.vocab_size, (6, 3), generator=g)
    cache = PagedKVCache(cfg.n_layers, 24, 4, cfg.n_kv_heads, cfg.hd, dtype, kernels=kernels)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    out = []
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            step = cache.prepare([tables[b]], [0], len(p))
            out.append(model(p.unsqueeze(0), cache, step, Output.LAST).float()[0])
        lens = [len(p) for p in prompts]
        for tok in steps:
            step = cache.prepare(tables, lens, 1)
            out.extend(model(tok.view(3, 1), cache, step, Output.LAST).float())  # (3, V)
            lens = [n + 1 for n in lens]
    return torch.stack(out)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind,qtype", [("llama", "Q4_1"), ("llama", "Q4_0"), ("llama", "Q8_0"), ("gpt2", "Q4_1")])
def test_gguf_model_with_kernels_matches_without(isa: str, kind: str, qtype: str, tmp_path: Path) -> None:
    """Load a tiny quantized GGUF as fp32 modules (the reference), fp32 with the kernels, bf16 modules and bf16 with
    the kernels. The kernels' model has the file's weights exactly: with exact products, in fp32 it equals the
    reference up to summation order, in bf16 it is at least as close to fp32 as the dense bf16 modules are; with
    int8 activations (the default of some builds) it stays within twice the dense bf16 error (measured 0.9-1.7x)."""
    from model_core.weights.loader import load_lm

    path = _tiny_gguf(kind, qtype, tmp_path)
    backend = select_backend(isa)
    int8 = backend.kernels is not None and backend.kernels.isa.int8
    ref = load_lm(path).model
    want = _decode_logits(ref, torch.float32, None)
    scale = want.abs().max().item()
    err_dense = (_decode_logits(load_lm(path, torch.bfloat16).model, torch.bfloat16, None) - want).abs().max().item()
    for dtype in DTYPES:
        fast = load_lm(path, dtype, quantized_max_rows=8, backend=backend).model
        wrapped = {n: m for n, m in fast.named_modules() if isinstance(m, QuantLinear)}
        assert len(wrapped) == 4 * ref.cfg.n_layers + 1  # the head (output.weight) is quantized too
        for name, layer in wrapped.items():
            assert torch.equal(layer.quant.dequantize(), ref.get_submodule(name).weight), name
        assert (fast.decoder_fast_path is not None) == (kind == "llama")  # the fused decoder runs llama layers
        err_fast = (_decode_logits(fast, dtype, backend.kernels) - want).abs().max().item()
        print(
            f"{isa} {kind} {qtype} {dtype}{' int8' if int8 else ''}: max |logit - fp32 modules| kernels "
            f"{err_fast:.2e}, dense bf16 modules {err_dense:.2e}"
        )
        if int8:
            assert err_fast <= max(2 * err_dense, 0.05 * scale)
        elif dtype == torch.float32:
            assert err_fast <= 1e-4 * max(scale, 1.0)
        else:
            assert err_fast <= max(1.5 * err_dense, 0.05 * scale)


@pytest.mark.parametrize("isa", [isa for isa in ISAS if native.ISAS[isa].int8])
def test_prompt_chunks_stay_exact_where_decode_rounds_activations_to_int8(isa: str, tmp_path: Path) -> None:
    """Builds whose decode steps take int8 activations run prompt chunks on the dense weights: prompt logits (the
    first token, prompt logprobs) equal the model's without the kernels, bit for bit; decode steps do differ."""
    from model_core.weights.loader import load_lm

    path = _tiny_gguf("llama", "Q4_1", tmp_path)
    backend = select_backend(isa)
    fast = load_lm(path, torch.float32, quantized_max_rows=64, backend=backend).model
    plain = load_lm(path, torch.float32).model
    tokens = torch.randint(0, plain.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fast(tokens), plain(tokens))  # 40 rows <= 64: the kernel would have taken them
        assert not torch.equal(fast(tokens[:, :1]), plain(tokens[:, :1]))  # one token per row: int8 decode


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_rows,one_call", [(8, True), (2, False), (0, False)])
def test_fused_decoder_matches_the_module_path(
    isa: str, dtype: torch.dtype, max_rows: int, one_call: bool, tmp_path: Path
) -> None:
    """Decode steps of 3 sequences: one native call per layer (4-bit, B <= max_rows), or native calls
    between PyTorch's matmuls (B > max_rows, or no 4-bit weights), against the same model's modules."""
    from model_core.weights.loader import load_lm

    backend = select_backend(isa)
    model = load_lm(_tiny_gguf("llama", "Q4_1", tmp_path), dtype, quantized_max_rows=max_rows, backend=backend).model
    fused = model.decoder_fast_path
    assert fused is not None and (fused.max_rows >= 3) == one_call  # type: ignore[attr-defined]
    got = _decode_logits(model, dtype, backend.kernels)
    model.decoder_fast_path = None
    want = _decode_logits(model, dtype, None)
    diff = (got - want).abs().max().item()
    print(
        f"{isa} {dtype} fused decode ({'one call per layer' if one_call else 'between matmuls'}) vs modules: "
        f"max |diff| {diff:.3g}"
    )
    assert torch.equal(got[:3], want[:3])  # prefill: the module path both times
    # bf16: the paths round in different places; with int8 activations a rounding can move an int8 step too
    bf16_tol = 0.06 if backend.kernels is not None and backend.kernels.isa.int8 else 0.03
    assert diff <= (bf16_tol if dtype == torch.bfloat16 else 1e-4) * want.abs().max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("every_batch", [False, True])
def test_one_call_decode_is_independent_of_the_batch(isa: str, dtype: torch.dtype, every_batch: bool) -> None:
    """Each sequence's row goes through the one-call layers on its own (norms, matmul rows, attention per
    sequence), so decoding 8 sequences together gives bit-identical logits to decoding each alone, or 2 and 4 at a
    time: always where every batch runs on the kernels (the batch-invariant mode: one method at every batch size);
    else too, but for the AVX512-BF16 build's bf16 matmuls on an AMX machine, whose batches of 8 rows and more take
    AMX tiles (another summation order: within bf16 rounding of the others)."""
    from model_core.qmatmul import ALL_ROWS
    from tests.utils import tiny_llama_q4

    kernels = kernels_for(isa)
    model = tiny_llama_q4(ALL_ROWS if every_batch else 8, kernels, dtype)
    assert model.decoder_fast_path is not None
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 1, 30, 12, 3, 17, 9, 2)]
    steps = torch.randint(0, cfg.vocab_size, (5, 8), generator=g)
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(8)]

    def run(groups: list[list[int]]) -> torch.Tensor:
        cache = PagedKVCache(cfg.n_layers, 32, 16, cfg.n_kv_heads, cfg.hd, dtype, kernels=kernels)
        out = torch.empty(5, 8, cfg.vocab_size)
        with torch.inference_mode():
            for b, p in enumerate(prompts):
                model(p.unsqueeze(0), cache, cache.prepare([tables[b]], [0], len(p)), Output.LAST)
            for t, tok in enumerate(steps):
                for rows in groups:
                    step = cache.prepare([tables[b] for b in rows], [len(prompts[b]) + t for b in rows], 1)
                    out[t, rows] = model(tok[rows].view(-1, 1), cache, step, Output.LAST).float()
        return out

    alone, eight = run([[b] for b in range(8)]), run([list(range(8))])
    assert torch.equal(alone, run([[3, 1], [0, 2], [5, 4, 6, 7]]))
    amx = native.cpu_features() & native.CPU_AMX_BF16
    if not every_batch and isa == "avx512bf16" and dtype == torch.bfloat16 and amx:
        assert not torch.equal(alone, eight)  # (the tiles ran: another summation order)
        assert (alone - eight).abs().max() <= 0.05 * alone.abs().max()
    else:
        assert torch.equal(alone, eight)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_final_norm_is_the_module_norm(isa: str, dtype: torch.dtype) -> None:
    """The fused decoder's final norm (one kernel call) against the model's RMSNorm module: the same rounding, the
    sum of squares in another order (fp32: within a few ulps; bf16: the same or one bf16 step apart)."""
    from tests.utils import tiny_llama_q4

    model = tiny_llama_q4(8, kernels_for(isa), dtype)
    fused = model.decoder_fast_path
    assert fused is not None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(model.cfg.d_model, generator=g))
        x = (torch.randn(5, 3, model.cfg.d_model, generator=g) * 7).to(dtype)
        got, want = fused.norm(x), model.norm(x)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    step = (2.0**-7 if dtype == torch.bfloat16 else 1e-6) * want.abs().float()  # (one bf16 step is 2^-7 relative)
    assert ((got.float() - want.float()).abs() <= step + 1e-30).all()
    assert torch.equal(fused.norm(x[:, -1]), got[:, -1])  # a strided view (the last positions): row by row


def _expected_auto() -> str | None:
    """bf16 kernels where AMX runs the bf16 matmuls, else the first int8 or exact SIMD build."""
    amx = native.cpu_features() & native.CPU_AMX_BF16
    return next((isa for isa in SIMD if isa != "avx512bf16" or amx), None)


def test_the_backend_is_the_best_build_this_cpu_runs_and_a_forced_one_must_run_here() -> None:
    auto = select_backend("auto")
    assert auto.isa == _expected_auto()
    assert select_backend("auto", "cuda").kernels is None  # the kernels are for the CPU
    assert select_backend("torch").kernels is None
    for isa in ISAS:  # each build this CPU runs can be forced (so one machine tests them all)
        assert select_backend(isa).isa == isa
    for isa in set(native.ISAS) - set(ISAS):  # the others are refused by name
        with pytest.raises(ValueError, match=f"kernels '{isa}'"):
            select_backend(isa)
    with pytest.raises(ValueError, match="unknown kernels"):
        select_backend("sse9")


def test_cpu_features_from_either_cpuinfo_form() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c bmi2\n"
    zen4 = "flags\t\t: avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16\n"
    spr = "flags\t\t: avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimddp\nCPU implementer\t: 0x41\n"
    assert native.features_from_cpuinfo(x86, "x86_64") == native.CPU_AVX2
    avx512 = native.CPU_AVX2 | native.CPU_AVX512F | native.CPU_AVX512BF16
    assert native.features_from_cpuinfo(zen4, "x86_64") == avx512
    amx = native.CPU_AMX_BF16 | native.CPU_AVX512VNNI
    assert native.features_from_cpuinfo(spr, "x86_64") == avx512 | amx
    assert native.features_from_cpuinfo(arm, "aarch64") == native.CPU_NEON | native.CPU_NEON_DOTPROD
    assert native.features_from_cpuinfo("", "aarch64") == native.CPU_NEON  # NEON is baseline on aarch64
    assert native.features_from_cpuinfo("", "x86_64") == 0
    if Path("/proc/cpuinfo").exists() and native.machine() == "x86_64":  # the CPU asked directly agrees on AVX2
        with open("/proc/cpuinfo") as f:  # (an emulator may report fewer features than the host's cpuinfo)
            from_cpuinfo = native.features_from_cpuinfo(f.read(), "x86_64")
        assert native.cpu_features() & native.CPU_AVX2 == from_cpuinfo & native.CPU_AVX2


def test_no_compiler_means_no_kernels_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    native.load.cache_clear()
    try:
        for isa in ISAS:
            with pytest.raises(native.KernelsUnavailable, match="build"):
                native.load(isa)
        with caplog.at_level(logging.WARNING, logger="model_core.backend"):
            backend = select_backend("auto")
        assert backend.kernels is None and backend.name == "torch"
        assert "native kernels off" in caplog.text
        if ISAS:
            with pytest.raises(ValueError, match="build"):
                select_backend(ISAS[0])  # asked for by name: an error, not a quiet fallback
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
        monkeypatch.delenv("CC")
        for isa in native.buildable():  # what an image build does where gcc is
            native.build(isa)
        monkeypatch.setenv("CC", "/bin/false")
        native.load.cache_clear()
        assert select_backend("auto").isa == _expected_auto()  # served from the cache, no compiler
    finally:
        native.load.cache_clear()
