"""The ctypes glue of the C kernels: kernels/aigc_kernels.h against native.ENTRY_POINTS (the one table the library
is typed from), the exported symbols, the statuses raised as KernelError, the callers' scratch buffers (the same
results as the library's own allocations, kept across steps), the fused decoder reading the model's tensors at
each call (a model cast, or given new weights, after a first decode step decodes as a freshly built one), and the
llama variants it runs: a QKV bias (Qwen 2) and QK-norm (Qwen 3) in the one-call layer and the attention entry point
(the same as through the other entry points, bit for bit; the module path's within its tolerances)."""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess

import pytest
import torch

from model_core import native
from model_core.fused_decode import FusedLlamaDecoder
from model_core.kv_cache import PagedKVCache, Scratch
from model_core.lm import CausalLM, Output
from model_core.qmatmul import (
    BF16,
    F16,
    GGML_TYPES,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QuantLinear,
    QuantWeight,
)
from tests.utils import kernels_for, kquant_weight, native_isas, tiny_llama_q4

ISAS = native_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler: the native kernels cannot build here")
HEADER = native.KERNEL_DIR / "aigc_kernels.h"

# C parameter and return types -> ENTRY_POINTS' kinds and ctypes return types
C_KINDS = {"int": "i", "float": "f", "int64_t": "l"}
C_RETURNS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "const char *": ctypes.c_char_p}


def _declarations() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """aigc_kernels.h's AIGC_API functions: name -> (return type, [(argument name, kind)])."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for ret, name, params in re.findall(r"AIGC_API\s+([\w\s*]+?)\s*\b(\w+)\(([^)]*)\);", text):
        args: list[tuple[str, str]] = []
        for p in (" ".join(p.split()) for p in params.split(",")):
            if p == "void":
                continue
            ctype, arg = p.rsplit(" ", 1)
            stars = arg.count("*")
            ctype, arg = (ctype + " " + "*" * stars).strip(), arg.lstrip("*")
            kind = "w" if ctype.endswith("*const *") else "p" if ctype.endswith("*") else C_KINDS[ctype]
            args.append((arg, kind))
        out[name] = (" ".join(ret.split()).replace(" *", " *"), args)
    return out


def test_the_header_declares_what_the_table_types() -> None:
    """Every function of aigc_kernels.h is in native.ENTRY_POINTS with the same arguments (names, kinds, order)
    and return type, and nothing else is; the statuses and CPU bits agree too."""
    decls = _declarations()
    assert list(decls) == list(native.ENTRY_POINTS)
    for name, (ret, args) in decls.items():
        entry = native.ENTRY_POINTS[name]
        assert list(entry.args) == args, f"{name}: the header has {args}"
        assert entry.restype is C_RETURNS[ret], f"{name} returns {ret}"
        assert entry.status == (ret == "int" and name != "aigc_cpu_features"), name
    text = HEADER.read_text()
    status = {int(v): k for k, v in re.findall(r"\b(AIGC_(?:OK|ERR_\w+)) = (-?\d+)", text)}
    assert {code: what.split()[0] for code, what in native.STATUS.items()} == status
    for bit, shift in re.findall(r"\b(CPU_\w+) = 1 << (\d+)", text):
        assert getattr(native, bit) == 1 << int(shift), bit
    assert re.findall(r"\bAIGC_PROJECTION_PARTS = (\d+)", text) == [str(native.PROJECTION_PARTS)]
    fields = re.search(r"enum \{\s*(AIGC_LA_\w+(?:,\s*AIGC_LA_\w+)*),\s*AIGC_LAYER_ARGS\s*\}", text)
    assert fields is not None
    assert [f.removeprefix("AIGC_LA_").lower() for f in re.split(r",\s*", fields[1])] == native.LAYER_ARGS
    modes = re.findall(r"\bAIGC_INT8 = (\d+), AIGC_EVERY_BATCH = (\d+)", text)
    assert modes == [(str(native.INT8), str(native.EVERY_BATCH))]


def test_every_source_includes_the_header() -> None:
    common = (native.KERNEL_DIR / "common.h").read_text()
    assert '#include "aigc_kernels.h"' in common
    assert '#include "common.h"' in (native.KERNEL_DIR / "simd.h").read_text()
    for src in native.KERNEL_DIR.glob("*.c"):
        assert re.search(r'#include "(common|simd|aigc_kernels)\.h"', src.read_text()), src.name


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm")
@pytest.mark.parametrize("isa", ISAS)
def test_the_library_exports_exactly_the_headers_functions(isa: str) -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", str(kernels_for(isa).path)], capture_output=True, text=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.split()[-2:-1] == ["T"]}
    assert exported == set(native.ENTRY_POINTS)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_layer_runs_gemma_blocks_as_the_other_entry_points(isa: str, dtype: torch.dtype) -> None:
    """Post-sublayer norms and a GELU-tanh gate (Gemma 2 and 3), with QK-norm, a soft-cap and a window, in both
    modes: bit for bit the layer through the other entry points (llama_rmsnorm in place on each sublayer's output,
    llama_swiglu with the gate), and different from the layer without them; one post norm alone, or an unknown gate,
    is refused before anything is written."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        outs = []
        for post, gate in ((True, 1), (False, 0)):
            fused, written, _ = _layer_case(kernels, dtype, i8, 17, qk_norm=True, post_norms=post, gate=gate)
            fused[ATTN_PARAMS] = (0.2, 6.0, 3)
            _decode_layer(kernels, fused)
            composed, by_entry, _ = _layer_case(kernels, dtype, i8, 17, qk_norm=True, post_norms=post, gate=gate)
            composed[ATTN_PARAMS] = (0.2, 6.0, 3)
            _layer_by_entry_points(kernels, composed)
            for a, b in zip(written, by_entry):
                assert torch.equal(a, b), f"post={post} gate={gate} i8={i8}"
            outs.append(written[0])
        assert not torch.equal(*outs)
    for change in ("one post norm", "gate"):
        args, written, _ = _layer_case(kernels, dtype, False, 17, post_norms=True, gate=1)
        if change == "gate":
            args[GATE] = 2
        else:
            args[6] = None  # post_ffn_norm
        before = [t.clone() for t in written]
        with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
            _decode_layer(kernels, args)
        assert all(torch.equal(a, b) for a, b in zip(written, before))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gelu_tanh_gate_is_pytorchs(isa: str, dtype: torch.dtype) -> None:
    """llama_swiglu with GATE_GELU_TANH: F.gelu(gate, approximate="tanh") * up, each rounded to the activations'
    dtype as the FFN module rounds them (fp32: within 4 ulps of the larger term; bf16: one rounding apart at most)."""
    kernels = kernels_for(isa)
    B, Fd = 3, 259
    gu = (torch.randn(B, 2 * Fd, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    g = torch.empty(B, Fd, dtype=dtype)
    kernels.call("llama_swiglu", gu.data_ptr(), g.data_ptr(), B, Fd, 1, int(dtype == torch.bfloat16))
    ref = torch.nn.functional.gelu(gu[:, :Fd], approximate="tanh") * gu[:, Fd:]
    tol = (2**-7 if dtype == torch.bfloat16 else 4e-6) * ref.float().abs().clamp(min=1.0)
    assert ((g.float() - ref.float()).abs() <= tol).all()
    with pytest.raises(native.KernelError, match="llama_swiglu .*AIGC_ERR_ARGS"):
        kernels.call("llama_swiglu", gu.data_ptr(), g.data_ptr(), B, Fd, 2, 0)


@pytest.mark.parametrize("isa", ISAS)
def test_a_nonzero_status_raises_naming_the_kernel_and_code(isa: str) -> None:
    kernels = kernels_for(isa)
    x, y = torch.zeros(2, 64), torch.zeros(2, 8)
    with pytest.raises(native.KernelError, match=r"quant_matmul .*returned -1: AIGC_ERR_ARGS.*K=33") as e:
        kernels.call(
            "quant_matmul", x.data_ptr(), 0, None, None, None, None, y.data_ptr(), 2, 8, 33, 0, 1, context="K=33"
        )
    assert (e.value.kernel, e.value.code, e.value.isa) == ("quant_matmul", native.AIGC_ERR_ARGS, isa)
    with pytest.raises(native.KernelError, match="llama_rmsnorm"):
        kernels.call("llama_rmsnorm", x.data_ptr(), x.data_ptr(), 1e-5, y.data_ptr(), 2, 0, 0)  # C = 0
    with pytest.raises(native.KernelError, match="llama_add_rmsnorm"):  # a norm weight without an output
        kernels.call("llama_add_rmsnorm", x.data_ptr(), x.data_ptr(), x.data_ptr(), 1e-5, None, 2, 64, 0)
    assert kernels.call("llama_swiglu", x.data_ptr(), y.data_ptr(), 0, 32, 0, 0) == 0  # an empty batch is fine
    # a sequence with more keys than its row table holds
    q, kv, out = torch.zeros(1, 2, 16), torch.zeros(8, 2, 16), torch.zeros(1, 2, 16)
    rows, lens = torch.arange(4).view(1, 4), torch.tensor([5], dtype=torch.int32)
    args = (q.data_ptr(), kv.data_ptr(), rows.data_ptr(), lens.data_ptr(), out.data_ptr(), 1, 2, 1, 16, 4, 0.25)
    args += (0.0, 0, 0, 1)  # softcap, window, act, nthreads
    with pytest.raises(native.KernelError, match="paged_attention_decode .*AIGC_ERR_ARGS"):
        kernels.call("paged_attention_decode", *args)
    assert kernels.call("aigc_cpu_features") == native.cpu_features()  # not a status: never raises


ATTN_PARAMS = slice(26, 29)  # llama_decode_layer's scale, softcap, window in _layer_case's arguments
GATE = 25  # its gate (GATE_SILU 0, GATE_GELU_TANH 1)
QTYPES = (Q4_1, Q4_0, Q8_0, Q4_1)  # _layer_case's projections (Wqkv, Wo, Wgate|up, Wdown) unless told otherwise


def _layer_case(
    kernels: native.Kernels,
    dtype: torch.dtype,
    i8: bool,
    seed: int,
    bias: bool = False,
    qk_norm: bool = False,
    qtypes: tuple[int, int, int, int] = QTYPES,
    kinds: bool = False,
    post_norms: bool = False,
    gate: int = 0,
    parts: tuple[int, int] | None = None,
    B: int = 3,
) -> tuple[list[object], list[torch.Tensor], tuple[int, ...]]:
    """Random llama_decode_layer arguments (without the scratch ones), the buffers it writes, and the shapes; with
    bias a QKV bias (Qwen 2), with qk_norm QK-norm weights (Qwen 3), with post_norms norms after each sublayer (Gemma
    2, 3), else NULL for them; gate its FFN activation (1: GELU-tanh); the projections' weights of
    the GGML types qtypes (in features multiples of 256 where one is a K-quant or a 5-bit kind), their kinds given
    (kinds, or any K-quant or 5-bit type) or NULL; parts (types a, b): Wqkv in 3 parts (q in qtypes[0], k in a, v in b)
    and Wgate|up in 2 (gate in qtypes[2], up in a), as a Q4_K_M file's, the parts given; B rows (at most 3)."""
    from tests.utils import quantized_weight as _quantized

    g = torch.Generator().manual_seed(seed)
    kquants = any(GGML_TYPES[qt].kind.entry == "quant_matmul_kind" for qt in (*qtypes, *(parts or ())))
    C, F, nh, nkv, hs, Tk = (256, 256, 4, 2, 64, 9) if kquants else (96, 160, 4, 2, 32, 9)
    # each projection's parts: (type, rows); (Wqkv, Wo, Wgate|up, Wdown)
    split = [[(qtypes[0], (nh + 2 * nkv) * hs)], [(qtypes[1], C)], [(qtypes[2], 2 * F)], [(qtypes[3], C)]]
    if parts is not None:
        split[0] = [(qtypes[0], nh * hs), (parts[0], nkv * hs), (parts[1], nkv * hs)]
        split[2] = [(qtypes[2], F), (parts[0], F)]
    ins = (C, nh * hs, C, F)
    weights = [
        (_quantized if GGML_TYPES[qt].kind.entry == "quant_matmul" else kquant_weight)(qt, n, ins[i], seed + 3 * i + j)[
            0
        ]
        for i, projection in enumerate(split)
        for j, (qt, n) in enumerate(projection)
    ]
    weights = [w.interleave() if i8 and w.kind.int8 else w for w in weights]
    w = (ctypes.c_void_p * (3 * len(weights)))(
        *[None if t is None else t.data_ptr() for q in weights for t in (q.qs, q.d, q.m)]
    )
    given = kinds or kquants or parts is not None
    kind_values = (ctypes.c_int32 * len(weights))(*[q.kind.value for q in weights]) if given else None
    rows_of = [[n for _, n in p] + [0] * (native.PROJECTION_PARTS - len(p)) for p in split]
    part_rows = (ctypes.c_int32 * (4 * native.PROJECTION_PARTS))(*sum(rows_of, [])) if parts is not None else None
    x = torch.randn(3, C, generator=g)[:B].to(dtype)
    norms = [(1 + 0.1 * torch.randn(C, generator=g)).to(dtype) for _ in range(2)]
    ang = torch.rand(B, hs // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)
    kv = torch.randn(3 * Tk + 1, 2 * nkv, hs, generator=g).to(dtype)
    rows = torch.stack([torch.randperm(3 * Tk, generator=g)[:Tk] for _ in range(3)])[:B].contiguous()
    lens = torch.tensor([Tk, 5, 1], dtype=torch.int32)[:B]
    write = rows[torch.arange(B), (lens - 1).long()].contiguous()
    act = int(dtype == torch.bfloat16)
    g_opt = torch.Generator().manual_seed(seed + 1000)  # (drawn apart: the other arguments are those without them)
    qkv_bias = torch.randn((nh + 2 * nkv) * hs, generator=g_opt) if bias else None  # fp32 whatever the activations
    qk = [(1 + 0.3 * torch.randn(hs, generator=g_opt)).to(dtype) if qk_norm else None for _ in range(2)]
    post = [(1 + 0.3 * torch.randn(C, generator=g_opt)).to(dtype) if post_norms else None for _ in range(2)]
    args: list[object] = [x, B, C, norms[0], norms[1], post[0], post[1], 1e-5, w, kind_values, part_rows, qkv_bias]
    args += [qk[0], qk[1]]
    args += [cos, sin, kv, write, rows]
    args += [lens, Tk, nh, nkv, hs, F, gate]
    args += [hs**-0.5, 0.0, 0]  # scale, softcap, window (ATTN_PARAMS)
    args += [act, int(i8), 2, (weights, split)]  # (weights: kept alive with the call's arguments)
    return args, [x, kv], (B, C, nh, nkv, hs, F, act)


def _ptr(a: object) -> object:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a


NO_LORA = (None, 0, None, None, None)  # llama_decode_layer's lora_slots, lora_G, lora_a, lora_bt, lora_ranks


def _decode_layer(
    kernels: native.Kernels,
    args: list[object],
    scratch: tuple[object, int] = (None, 0),
    lora: tuple[object, ...] = NO_LORA,
) -> None:
    kernels.call("llama_decode_layer", *[_ptr(a) for a in args[:-1]], *scratch, *[_ptr(a) for a in lora])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_scratch_gives_what_the_librarys_own_allocations_give(isa: str, dtype: torch.dtype) -> None:
    """llama_decode_layer with scratch NULL (allocated per call) and with a caller's buffer (dirty, and bigger than
    needed): bit-identical outputs; too small a buffer is refused."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        outs = []
        for scratch in ("none", "dirty"):
            args, written, shapes = _layer_case(kernels, dtype, i8, seed=5, bias=True, qk_norm=True)
            need = kernels.call("llama_decode_scratch_bytes", *shapes)
            assert need > 0 and need % 64 == 0
            buf = torch.full((need + 100,), 0xA5, dtype=torch.uint8)
            _decode_layer(kernels, args, (None, 0) if scratch == "none" else (buf.data_ptr(), buf.numel()))
            outs.append([t.clone() for t in written])
            if scratch == "dirty":
                with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
                    _decode_layer(kernels, args, (buf.data_ptr(), need - 1))
        for a, b in zip(*outs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_the_decode_layer_refuses_bad_lora_arguments_before_writing(isa: str) -> None:
    """LoRA arguments outside what lora_add takes (a slot past G, a negative rank, ranks without their matrices, G
    of 0) are AIGC_ERR_ARGS with x and the cache untouched."""
    kernels = kernels_for(isa)
    args, written, _ = _layer_case(kernels, torch.float32, False, seed=9)
    before = [t.clone() for t in written]
    a = torch.zeros(64 * 1024)
    ranks = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32)  # (4 projections, 2 slots)
    for slots, G, stacks, r in [
        ([0, 2, -1], 2, (a, a), ranks),
        ([0, 1, -1], 2, (a, a), torch.tensor([1, -1, 0, 0, 0, 0, 0, 0], dtype=torch.int32)),
        ([0, 1, -1], 2, (None, None), ranks),
        ([0, 1, -1], 0, (a, a), ranks),
    ]:
        with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
            _decode_layer(kernels, args, lora=(torch.tensor(slots, dtype=torch.int32), G, *stacks, r))
        assert all(torch.equal(t, b) for t, b in zip(written, before, strict=True))


def _layer_by_entry_points(kernels: native.Kernels, args: list[object]) -> None:
    """What llama_decode_layer does to x and kv, through the library's other entry points (norms, quant_matmul with
    the QKV bias, llama_attention with the same QK-norm, scale, softcap and window, SwiGLU, residual adds)."""
    x, B, C, attn_norm, ffn_norm, post_attn, post_ffn, eps, _, _, _, qkv_bias, q_norm, k_norm = args[:14]
    cos, sin, kv, write, rows, lens, Tk, nh, nkv, hs, F, gate = args[14:26]
    scale, softcap, window, act, i8, threads, (weights, split) = args[26:]  # type: ignore[misc]
    assert isinstance(x, torch.Tensor) and isinstance(B, int) and isinstance(C, int) and isinstance(F, int)
    assert isinstance(nh, int) and isinstance(nkv, int) and isinstance(hs, int) and isinstance(weights, list)
    call, p = kernels.call, _ptr

    def matmul(inp: torch.Tensor, i: int, N: int, K: int) -> torch.Tensor:
        """The projection as QuantLinear runs it: quant_matmul, or quant_matmul_kind (K-quants, 5-bit kinds), part
        by part, the parts' outputs side by side."""
        first = sum(len(projection) for projection in split[:i])
        out = []
        for j, (_, n) in enumerate(split[i]):
            w, y = weights[first + j], torch.empty(B, n, dtype=x.dtype)
            m = None if w.m is None else w.m.data_ptr()
            kind = () if w.kind.entry == "quant_matmul" else (w.kind.value,)
            bias = None if i or qkv_bias is None else qkv_bias[sum(r for _, r in split[i][:j]) :][:n].contiguous()
            qs, d = w.qs.data_ptr(), w.d.data_ptr()
            call(w.kind.entry, inp.data_ptr(), act, *kind, qs, d, m, p(bias), y.data_ptr(), B, n, K, i8, threads)
            out.append(y)
        y = torch.cat(out, 1)
        assert y.shape == (B, N)
        return y

    h, att, g = (
        torch.empty(B, C, dtype=x.dtype),
        torch.empty(B, nh * hs, dtype=x.dtype),
        torch.empty(B, F, dtype=x.dtype),
    )
    call("llama_rmsnorm", x.data_ptr(), p(attn_norm), eps, h.data_ptr(), B, C, act)
    qkv = matmul(h, 0, (nh + 2 * nkv) * hs, C)
    ptrs = [p(a) for a in (qkv, B, eps, q_norm, k_norm, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs)]
    call("llama_attention", *ptrs, scale, softcap, window, act, threads, None, 0)
    o = matmul(att, 1, C, nh * hs)  # (kept referenced until the call that reads it is done)
    if post_attn is not None:
        call("llama_rmsnorm", o.data_ptr(), p(post_attn), eps, o.data_ptr(), B, C, act)
    call("llama_add_rmsnorm", x.data_ptr(), o.data_ptr(), p(ffn_norm), eps, h.data_ptr(), B, C, act)
    gu = matmul(h, 2, 2 * F, C)
    call("llama_swiglu", gu.data_ptr(), g.data_ptr(), B, F, gate, act)
    o = matmul(g, 3, C, F)
    if post_ffn is not None:
        call("llama_rmsnorm", o.data_ptr(), p(post_ffn), eps, o.data_ptr(), B, C, act)
    call("llama_add_rmsnorm", x.data_ptr(), o.data_ptr(), None, eps, None, B, C, act)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_layer_passes_scale_softcap_and_window_to_its_attention(isa: str, dtype: torch.dtype) -> None:
    """llama_decode_layer with a scale other than 1/sqrt(hs), soft-capped scores and a window shorter than two of
    its rows: bit for bit the same layer through the other entry points (its attention: llama_attention, tested
    against PyTorch in test_native.py, with the same three values), and not what the default attention gives; out
    of range values are refused before anything is written."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        results = {}
        for params in [(0.2, 6.0, 3), (32**-0.5, 0.0, 0)]:
            fused, written, _ = _layer_case(kernels, dtype, i8, seed=7)
            fused[ATTN_PARAMS] = params
            _decode_layer(kernels, fused)
            composed, by_entry, _ = _layer_case(kernels, dtype, i8, seed=7)
            composed[ATTN_PARAMS] = params
            _layer_by_entry_points(kernels, composed)
            for a, b in zip(written, by_entry):
                assert torch.equal(a, b), f"{params} i8={i8}"
            results[params] = written[0]
        assert not torch.equal(*results.values())
        for bad in [(0.2, -1.0, 0), (0.2, 0.0, -2), (0.2, math.nan, 3)]:
            args, written, _ = _layer_case(kernels, dtype, i8, seed=7)
            before = [t.clone() for t in written]
            args[ATTN_PARAMS] = bad
            with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
                _decode_layer(kernels, args)
            assert all(torch.equal(a, b) for a, b in zip(written, before))  # x and the cache untouched


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_layer_adds_the_qkv_bias_and_norms_the_q_and_k_heads(isa: str, dtype: torch.dtype) -> None:
    """llama_decode_layer with a QKV bias (Qwen 2), QK-norm weights (Qwen 3) or both, with the default attention and
    a Gemma-style one: bit for bit the same layer through the other entry points (quant_matmul adding the bias,
    llama_attention norming the heads), and each option changes the layer's output and cache (NULL is no bias, no
    norm: the plain layer)."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        for params in [(32**-0.5, 0.0, 0), (0.2, 6.0, 3)]:
            results = []
            for bias, qk_norm in [(False, False), (True, False), (False, True), (True, True)]:
                fused, written, _ = _layer_case(kernels, dtype, i8, 9, bias, qk_norm)
                fused[ATTN_PARAMS] = params
                _decode_layer(kernels, fused)
                composed, by_entry, _ = _layer_case(kernels, dtype, i8, 9, bias, qk_norm)
                composed[ATTN_PARAMS] = params
                _layer_by_entry_points(kernels, composed)
                for a, b in zip(written, by_entry):
                    assert torch.equal(a, b), f"bias={bias} qk_norm={qk_norm} {params} i8={i8}"
                assert all(torch.isfinite(t.float()).all() for t in written)
                results.append(written)
            for i, a in enumerate(results):  # x and the cache of every pair of options differ
                for b in results[i + 1 :]:
                    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


# Wqkv, Wo, Wgate|up, Wdown: a Q4_K_M file's mixes (Q5_0 or Q4_K attention, Q6_K or Q8_0 down), every other kind
KQUANT_MIXES = [
    (Q5_0, Q4_K, Q4_K, Q6_K),
    (Q4_K, Q5_0, Q4_K, Q8_0),
    (Q5_K, Q6_K, Q5_1, Q4_0),
    (Q8_0, Q4_1, Q6_K, Q5_K),
    (F16, Q4_K, BF16, Q6_K),  # float weights (exact products in either mode) beside quantized ones
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtypes", KQUANT_MIXES, ids=lambda q: "-".join(GGML_TYPES[t].name for t in q))
def test_the_decode_layer_runs_any_mix_of_kinds_as_the_per_projection_kernels(
    isa: str, dtype: torch.dtype, qtypes: tuple[int, int, int, int]
) -> None:
    """llama_decode_layer with its projections' kinds: K-quants, 5-bit and 4/8-bit blocks mixed, in both modes (int8:
    every projection interleaved), with and without a QKV bias and QK-norm, with the default attention and a
    Gemma-style one: bit for bit the layer through the other entry points (each projection by quant_matmul_kind or
    quant_matmul, as QuantLinear runs it); an unknown kind or a missing m are refused before anything is written."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        for n, params in enumerate([(64**-0.5, 0.0, 0), (0.2, 6.0, 3)]):
            bias, qk_norm = n == 1, n == 1
            fused, written, _ = _layer_case(kernels, dtype, i8, 11, bias, qk_norm, qtypes)
            fused[ATTN_PARAMS] = params
            _decode_layer(kernels, fused)
            composed, by_entry, _ = _layer_case(kernels, dtype, i8, 11, bias, qk_norm, qtypes)
            composed[ATTN_PARAMS] = params
            _layer_by_entry_points(kernels, composed)
            for a, b in zip(written, by_entry):
                assert torch.equal(a, b), f"{params} i8={i8}"
            assert all(torch.isfinite(t.float()).all() for t in written)
    for kind in (99, -1):
        args, written, _ = _layer_case(kernels, dtype, False, 11, qtypes=qtypes)
        before = [t.clone() for t in written]
        bad = (ctypes.c_int32 * 4)(*args[9])  # type: ignore[misc]
        bad[2] = kind
        args[9] = bad
        with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
            _decode_layer(kernels, args)
        assert all(torch.equal(a, b) for a, b in zip(written, before))
    args, written, _ = _layer_case(kernels, dtype, False, 11, qtypes=qtypes)
    w = args[8]
    assert isinstance(w, ctypes.Array)
    i = next(i for i, q in enumerate(qtypes) if q not in (Q8_0, Q5_0, F16, BF16))
    w[3 * i + 2] = None  # the m of a kind that needs one
    before = [t.clone() for t in written]
    with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
        _decode_layer(kernels, args)
    assert all(torch.equal(a, b) for a, b in zip(written, before))


# (Wqkv's q, Wo, Wgate|up's gate, Wdown), (k and up, v): a Q4_K_M file's QKV of Q4_K q, k and Q6_K v; 4/8-bit parts;
# float parts beside quantized ones
PART_MIXES = [
    ((Q4_K, Q4_K, Q4_K, Q6_K), (Q4_K, Q6_K)),
    ((Q4_0, Q4_1, Q8_0, Q4_1), (Q4_1, Q8_0)),
    ((F16, Q4_K, Q6_K, Q5_0), (BF16, Q5_K)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", PART_MIXES, ids=lambda m: "-".join(GGML_TYPES[t].name for t in (*m[0], *m[1])))
def test_the_decode_layer_runs_projections_in_parts_of_different_kinds(
    isa: str, dtype: torch.dtype, mix: tuple[tuple[int, int, int, int], tuple[int, int]]
) -> None:
    """Wqkv in 3 parts and Wgate|up in 2, of different kinds, in both modes, at 3 rows and at 1 (where each part
    writes its columns in place), with a QKV bias and QK-norm: bit for bit the layer through the other entry points
    (each part by its kind's kernel, the outputs side by side); parts that do not add up to a projection's outputs,
    a negative part, a part after a zero, or parts without kinds are refused before anything is written."""
    qtypes, parts = mix
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        for B in (3, 1):
            fused, written, _ = _layer_case(kernels, dtype, i8, 21, True, True, qtypes, parts=parts, B=B)
            _decode_layer(kernels, fused)
            composed, by_entry, _ = _layer_case(kernels, dtype, i8, 21, True, True, qtypes, parts=parts, B=B)
            _layer_by_entry_points(kernels, composed)
            for a, b in zip(written, by_entry):
                assert torch.equal(a, b), f"i8={i8} B={B}"
            assert all(torch.isfinite(t.float()).all() for t in written)
    P = native.PROJECTION_PARTS
    for at, value in ((0, 1), (P, -1), (2 * P + 2, 8), (P + 1, 0), ("kinds", None)):
        args, written, _ = _layer_case(kernels, dtype, False, 21, qtypes=qtypes, parts=parts)
        if at == "kinds":
            args[9] = None
        else:
            bad = args[10]
            assert isinstance(bad, ctypes.Array) and isinstance(at, int)
            if at == P + 1:  # Wo's parts: (C, 0, 0) -> (C - 32, 0, 32)
                bad[P], bad[P + 2] = bad[P] - 32, 32
            else:
                bad[at] += value
        before = [t.clone() for t in written]
        with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
            _decode_layer(kernels, args)
        assert all(torch.equal(a, b) for a, b in zip(written, before)), at


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_layers_kinds_of_4_and_8_bit_weights_are_null_kinds(isa: str, dtype: torch.dtype) -> None:
    """Kinds given for 4/8-bit projections (QKIND_Q4, QKIND_Q8) in either mode: bit for bit the layer with kinds NULL;
    a K-quant's block on a projection whose input is not a multiple of 256 is refused."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        outs = []
        for kinds in (False, True):
            args, written, _ = _layer_case(kernels, dtype, i8, 13, True, True, kinds=kinds)
            _decode_layer(kernels, args)
            outs.append(written)
        for a, b in zip(*outs):
            assert torch.equal(a, b), f"i8={i8}"
    args, written, _ = _layer_case(kernels, dtype, False, 13, kinds=True)  # C = 96: no K-quant fits
    bad = args[9]
    assert isinstance(bad, ctypes.Array)
    bad[0] = GGML_TYPES[Q4_K].kind.value
    with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
        _decode_layer(kernels, args)


def _attention_case(
    dtype: torch.dtype, seed: int
) -> tuple[dict[str, torch.Tensor], tuple[int, int, int, int, int], torch.Tensor, torch.Tensor]:
    """llama_attention's tensors (qkv, cos, sin, kv, write, rows, lens) for B = 3 rows, its shapes (B, nh, nkv, hs,
    Tk), and random QK-norm weights (q_norm, k_norm) in dtype."""
    g = torch.Generator().manual_seed(seed)
    B, nh, nkv, hs, Tk = 3, 4, 2, 64, 9
    ang = torch.rand(B, hs // 2, generator=g) * 6
    rows = torch.stack([torch.randperm(B * Tk, generator=g)[:Tk] for _ in range(B)])  # (B, Tk) int64
    lens = torch.tensor([Tk, 5, 1], dtype=torch.int32)
    t = {
        "qkv": (torch.randn(B, (nh + 2 * nkv) * hs, generator=g) * 3).to(dtype),
        "cos": torch.cat([ang.cos(), ang.cos()], 1),
        "sin": torch.cat([ang.sin(), ang.sin()], 1),
        "kv": torch.randn(B * Tk + 1, 2 * nkv, hs, generator=g).to(dtype),
        "write": rows[torch.arange(B), (lens - 1).long()].contiguous(),
        "rows": rows,
        "lens": lens,
    }
    q_norm, k_norm = ((1 + 0.3 * torch.randn(hs, generator=g)).to(dtype) for _ in range(2))
    return t, (B, nh, nkv, hs, Tk), q_norm, k_norm


def _attention(
    kernels: native.Kernels,
    t: dict[str, torch.Tensor],
    shapes: tuple[int, int, int, int, int],
    eps: float,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
) -> torch.Tensor:
    """llama_attention on t (its qkv and kv updated in place); returns att (B, nh hs)."""
    B, nh, nkv, hs, Tk = shapes
    att = torch.empty(B, nh * hs, dtype=t["qkv"].dtype)
    ptrs = [t[k].data_ptr() for k in ("cos", "sin", "kv", "write", "rows", "lens")]
    act = int(att.dtype == torch.bfloat16)
    norms = (_ptr(q_norm), _ptr(k_norm))
    args = (t["qkv"].data_ptr(), B, eps, *norms, *ptrs, att.data_ptr(), Tk, nh, nkv, hs, hs**-0.5, 0.0, 0, act, 2)
    kernels.call("llama_attention", *args, None, 0)
    return att


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_norms_each_q_and_k_head_before_rope(isa: str, dtype: torch.dtype) -> None:
    """llama_attention with q_norm and k_norm: bit for bit llama_rmsnorm over each q and k head (a head a row) followed
    by llama_attention without them (qkv rotated in place, the cache, the output); the rotated heads are what
    model_core.norms.RMSNorm (the module path's QK-norm, in the activations' dtype) then RoPE give, within a rounding;
    a norm without the other norms only its own heads."""
    from model_core.norms import RMSNorm

    kernels, eps = kernels_for(isa), 1e-6
    t, shapes, q_norm, k_norm = _attention_case(dtype, seed=3)
    B, nh, nkv, hs, _ = shapes
    act = int(dtype == torch.bfloat16)
    heads = t["qkv"].view(B, nh + 2 * nkv, hs)
    fused = {k: v.clone() for k, v in t.items()}
    att = _attention(kernels, fused, shapes, eps, q_norm, k_norm)
    composed = {k: v.clone() for k, v in t.items()}
    for lo, hi, w in ((0, nh, q_norm), (nh, nh + nkv, k_norm)):  # the heads through llama_rmsnorm, written back
        rows = heads[:, lo:hi].reshape(-1, hs).contiguous()
        normed = torch.empty_like(rows)
        kernels.call("llama_rmsnorm", rows.data_ptr(), w.data_ptr(), eps, normed.data_ptr(), rows.shape[0], hs, act)
        composed["qkv"].view(B, nh + 2 * nkv, hs)[:, lo:hi] = normed.view(B, hi - lo, hs)
    want = _attention(kernels, composed, shapes, eps, None, None)
    assert torch.equal(att, want)
    assert torch.equal(fused["qkv"], composed["qkv"]) and torch.equal(fused["kv"], composed["kv"])
    # against the module path's QK-norm, then RoPE in fp32 on its (rounded) output
    ref_heads = []
    for lo, hi, w in ((0, nh, q_norm), (nh, nh + nkv, k_norm)):
        norm = RMSNorm(hs, eps).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            x = norm(heads[:, lo:hi]).float()  # (B, heads, hs), rounded to dtype as the module path's
        c, s = t["cos"].unsqueeze(1), t["sin"].unsqueeze(1)
        ref_heads.append(x * c + torch.cat([-x[..., hs // 2 :], x[..., : hs // 2]], -1) * s)
    ref = torch.cat([*ref_heads, heads[:, nh + nkv :].float()], 1)  # (B, nh + 2 nkv, hs), v untouched
    got = fused["qkv"].view(B, nh + 2 * nkv, hs).float()
    tol = (2**-7 if dtype == torch.bfloat16 else 1e-5) * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    assert torch.equal(got[:, nh + nkv :], ref[:, nh + nkv :])
    # q_norm alone: the q heads as with both, the k heads as with none
    only_q = {k: v.clone() for k, v in t.items()}
    _attention(kernels, only_q, shapes, eps, q_norm, None)
    plain = {k: v.clone() for k, v in t.items()}
    _attention(kernels, plain, shapes, eps, None, None)
    q_n = nh * hs
    assert torch.equal(only_q["qkv"][:, :q_n], fused["qkv"][:, :q_n])
    assert torch.equal(only_q["qkv"][:, q_n:], plain["qkv"][:, q_n:])


def test_scratch_is_kept_and_grown_not_allocated_per_call() -> None:
    s = Scratch()
    a = s.take("h", (2, 8), torch.float32)
    assert s.take("h", (2, 8), torch.float32) is a and s.allocations == 1
    b = s.take("h", (1, 8), torch.float32)  # smaller: a view of the same storage
    assert b.data_ptr() == a.data_ptr() and s.allocations == 1
    c = s.take("h", (4, 8), torch.bfloat16)  # the same bytes in another dtype
    assert c.data_ptr() == a.data_ptr() and s.allocations == 1
    d = s.take("h", (16, 8), torch.float32)  # bigger: grown once
    assert s.allocations == 2 and s.nbytes("h") == 16 * 8 * 4
    assert s.take("h", (2, 8), torch.float32).data_ptr() == d.data_ptr()  # later views are of the new storage
    with torch.inference_mode():  # made in inference mode, written outside it (and back): normal tensors
        e = s.take("q", (3,), torch.float32)
    e.copy_(torch.ones(3))
    with torch.inference_mode():
        e.copy_(torch.zeros(3))


def _decode(
    model: CausalLM,
    kernels: native.Kernels,
    dtype: torch.dtype,
    batches: list[int],
    steps: int = 3,
    fresh_scratch: bool = False,
) -> tuple[torch.Tensor, PagedKVCache]:
    """Prefill 4 prompts, then `steps` decode steps of each batch size in `batches` (the first rows). Logits, fp32.
    fresh_scratch: a new Scratch for every step (nothing reused)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (6, 2, 9, 4)]
    cache = PagedKVCache(cfg.n_layers, 32, 8, cfg.n_kv_heads, cfg.hd, dtype, kernels=kernels)
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(4)]
    lens = [len(p) for p in prompts]
    out = []
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            model(p.unsqueeze(0), cache, cache.prepare([tables[b]], [0], len(p)), Output.LAST)
        for B in batches:
            for _ in range(steps):
                tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
                step = cache.prepare(tables[:B], lens[:B], 1)
                if fresh_scratch:
                    cache.scratch = Scratch()
                out.append(model(tok, cache, step, Output.LAST).float().flatten())
                lens[:B] = [n + 1 for n in lens[:B]]
    return torch.cat(out), cache


# the llama variants the fused decoder runs: plain llama, Qwen 2's QKV biases, Qwen 3's QK-norm
LLAMA: dict[str, bool] = {}
QWEN2, QWEN3 = {"qkv_bias": True}, {"qk_norm": True}
VARIANTS = [pytest.param(LLAMA, id="llama"), pytest.param(QWEN2 | QWEN3, id="qkv_bias+qk_norm")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("max_rows", [4, 1])  # one call per layer up to 4 rows; between the matmuls above 1
@pytest.mark.parametrize("options", VARIANTS)
def test_batches_growing_and_shrinking_reuse_the_caches_scratch(
    isa: str, max_rows: int, options: dict[str, bool]
) -> None:
    """Decode steps of 1, 4, then 2 rows on one cache: bit for bit the logits of the same steps each with scratch of
    its own (the buffers grown for 4 rows, then serving 2, hold nothing over), and no allocation once the sizes
    have been seen."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(max_rows, kernels, torch.float32, **options)
    assert model.decoder_fast_path is not None
    got, cache = _decode(model, kernels, torch.float32, [1, 4, 2])
    want, _ = _decode(model, kernels, torch.float32, [1, 4, 2], fresh_scratch=True)
    assert torch.equal(got, want)
    grown = cache.scratch.allocations
    assert grown > 0
    with torch.inference_mode():  # more steps of sizes seen before: no new storage
        for B in (4, 1, 2, 4):
            step = cache.prepare([list(range(8 * b, 8 * b + 8)) for b in range(B)], [20] * B, 1)
            model(torch.zeros(B, 1, dtype=torch.long), cache, step, Output.LAST)
    assert cache.scratch.allocations == grown


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("max_rows", [4, 1])
@pytest.mark.parametrize("options", VARIANTS)
def test_a_model_cast_after_a_decode_step_decodes_as_a_fresh_decoder(
    isa: str, max_rows: int, options: dict[str, bool]
) -> None:
    """Decode in fp32, then cast the model to bf16 (new parameter storage, rotary tables, dtype; the QKV bias and the
    QK-norm weights too) and decode on a bf16 cache with the same decoder object: the logits equal those of a decoder
    built after the cast, bit for bit (no fp32 addresses or activation dtype kept from the first call)."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(max_rows, kernels, torch.float32, **options)
    fused = model.decoder_fast_path
    assert isinstance(fused, FusedLlamaDecoder)
    _decode(model, kernels, torch.float32, [3])
    norm_before = model.blocks[0].attn_norm.weight.data_ptr()
    model.to(torch.bfloat16)
    assert model.blocks[0].attn_norm.weight.data_ptr() != norm_before  # new storage: stale addresses would be wrong
    got, _ = _decode(model, kernels, torch.bfloat16, [3, 2])
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    want, _ = _decode(model, kernels, torch.bfloat16, [3, 2])
    assert torch.equal(got, want)
    model.decoder_fast_path = fused
    with torch.inference_mode():  # a cache of another dtype than the model's: the module path, which refuses it
        cache = PagedKVCache(
            model.cfg.n_layers, 4, 8, model.cfg.n_kv_heads, model.cfg.hd, torch.float32, kernels=kernels
        )
        step = cache.prepare([[0]], [0], 1)
        assert not fused.applies(step, cache)
        with pytest.raises(ValueError, match="queries"):
            model(torch.zeros(1, 1, dtype=torch.long), cache, step)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("options", VARIANTS)
def test_new_weights_after_a_decode_step_are_the_ones_used(isa: str, options: dict[str, bool]) -> None:
    """Replace every layer's quantized weights (new tensors: new addresses; their dense layers, with another QKV bias)
    and a norm's parameter (and a QK-norm's) after a first decode step: the same decoder object gives what one built
    on the new weights gives, and not the old logits; and likewise after a QKV bias is changed in place."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(4, kernels, torch.float32, **options)
    fused = model.decoder_fast_path
    before, _ = _decode(model, kernels, torch.float32, [3])
    other = tiny_llama_q4(4, kernels, torch.float32, seed=1, **options)
    for mine, theirs in zip(model.modules(), other.modules()):
        if isinstance(mine, QuantLinear) and isinstance(theirs, QuantLinear):
            q = theirs.quant
            mine.quant = QuantWeight(q.qs.clone(), q.d.clone(), None if q.m is None else q.m.clone(), q.rows)
            mine.dense = theirs.dense
    with torch.no_grad():
        model.blocks[1].ffn_norm.weight = torch.nn.Parameter(model.blocks[1].ffn_norm.weight * 1.5)
        if options.get("qk_norm"):
            k_norm = model.blocks[0].attn.k_norm
            k_norm.weight = torch.nn.Parameter(k_norm.weight * 0.5)  # type: ignore[union-attr]
    got, _ = _decode(model, kernels, torch.float32, [3])
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    want, _ = _decode(model, kernels, torch.float32, [3])
    assert torch.equal(got, want) and not torch.equal(got, before)
    model.decoder_fast_path = fused
    if options.get("qkv_bias"):  # a bias changed in place (the same tensor): read at each step as well
        qkv = model.blocks[1].attn.qkv
        assert isinstance(qkv, QuantLinear) and isinstance(qkv.dense.bias, torch.Tensor)
        with torch.no_grad():
            qkv.dense.bias.mul_(-1)
        got, _ = _decode(model, kernels, torch.float32, [3])
        model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
        want, _ = _decode(model, kernels, torch.float32, [3])
        assert torch.equal(got, want)
        model.decoder_fast_path = fused


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [pytest.param(QWEN2, id="qkv_bias"), pytest.param(QWEN3, id="qk_norm")])
def test_the_fused_decoder_runs_qkv_biases_and_qk_norm_as_the_module_path(
    isa: str, dtype: torch.dtype, options: dict[str, bool]
) -> None:
    """Qwen 2's QKV biases and Qwen 3's QK-norm in the fused decoder (quantized projections, Q4_1): decode steps of 3
    then 1 rows, one call per layer (max_rows 4) and between the matmuls (max_rows 1: the 3-row steps on the dense
    projections, which add their bias themselves), against the module path on the same QuantLinears: within the
    tolerances of test_native.py's test_fused_decoder_matches_the_module_path (fp32 summation order; bf16 roundings
    in other places, and with int8 activations a rounding that moves an int8 step)."""
    kernels = kernels_for(isa)
    for max_rows in (4, 1):
        model = tiny_llama_q4(max_rows, kernels, dtype, **options)
        fused = model.decoder_fast_path
        assert isinstance(fused, FusedLlamaDecoder) and fused.max_rows == max_rows
        got, _ = _decode(model, kernels, dtype, [3, 1])
        model.decoder_fast_path = None
        want, _ = _decode(model, kernels, dtype, [3, 1])
        diff = (got - want).abs().max().item()
        print(f"{isa} {dtype} {options} max_rows={max_rows}: fused vs modules max |diff| {diff:.3g}")
        bf16_tol = 0.06 if kernels.isa.int8 else 0.03
        assert diff <= (bf16_tol if dtype == torch.bfloat16 else 1e-4) * want.abs().max().item()


def _layer_row(args: list[object]) -> list[int]:
    """llama_decode_layers' table row (native.LAYER_ARGS) of a _layer_case's arguments, without LoRA."""
    a = [_ptr(v) for v in args]
    values = {
        "attn_norm": a[3], "ffn_norm": a[4], "post_attn_norm": a[5], "post_ffn_norm": a[6],
        "w": ctypes.addressof(args[8]), "kinds": args[9] and ctypes.addressof(args[9]),
        "parts": args[10] and ctypes.addressof(args[10]), "qkv_bias": a[11], "q_norm": a[12], "k_norm": a[13],
        "cos": a[14], "sin": a[15], "kv": a[16], "window": a[28], "i8": a[30],
    }  # fmt: skip
    return [int(values.get(name) or 0) for name in native.LAYER_ARGS]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_layers_in_one_call_are_the_calls_one_by_one(isa: str, dtype: torch.dtype) -> None:
    """llama_decode_layers over two layers (each its own weights, norms, rope tables and cache; the step's rows
    shared) gives llama_decode_layer on each in turn, bit for bit; a layer that fails stops the loop, after the
    layers before it ran, and its index comes back in `failed`."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        first, (x, kv0), shapes = _layer_case(kernels, dtype, i8, 21, bias=True, qk_norm=True)
        second, (_, kv1), _ = _layer_case(kernels, dtype, i8, 22, qk_norm=True)
        second[17:20] = first[17:20]  # write, rows, lens: the step's
        second[28] = 2  # a window on the second layer
        want_x, want_kv = x.clone(), [kv0.clone(), kv1.clone()]
        for args, kv in zip((first, second), want_kv):
            _decode_layer(kernels, [want_x, *args[1:16], kv, *args[17:]])
        table = torch.tensor([_layer_row(first), _layer_row(second)], dtype=torch.int64)
        step = [_ptr(v) for v in (*first[17:21], *first[21:26], *first[26:28], first[29], first[31])]
        failed = ctypes.c_int32(7)
        kernels.call(
            "llama_decode_layers", 2, table.data_ptr(), x.data_ptr(), *first[1:3], first[7], *step[:9], *step[9:],
            None, 0, ctypes.addressof(failed),
        )  # fmt: skip
        assert failed.value == -1
        assert torch.equal(x, want_x) and torch.equal(kv0, want_kv[0]) and torch.equal(kv1, want_kv[1])
        one_x = x.clone()
        _decode_layer(kernels, [one_x, *first[1:]])
        table[1, native.LAYER_ARGS.index("window")] = -1
        with pytest.raises(native.KernelError, match="llama_decode_layers .*AIGC_ERR_ARGS"):
            kernels.call(
                "llama_decode_layers", 2, table.data_ptr(), x.data_ptr(), *first[1:3], first[7], *step[:9],
                *step[9:], None, 0, ctypes.addressof(failed),
            )  # fmt: skip
        assert failed.value == 1 and torch.equal(x, one_x)


@pytest.mark.parametrize("isa", ISAS)
def test_the_layers_arguments_are_read_once_and_again_where_a_tensor_moved(
    isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-call layers' table of arguments is read at a step and kept for the next ones while nothing it was read
    from changed; a norm's data replaced under the same Parameter (new storage, as model.to() replaces it) is read
    again at the next step, and that step's logits are those of a decoder built after the change."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(4, kernels, torch.float32, **QWEN2)
    fused = model.decoder_fast_path
    assert isinstance(fused, FusedLlamaDecoder)
    reads = []
    read = fused._read_table
    monkeypatch.setattr(fused, "_read_table", lambda *a: reads.append(1) or read(*a))
    _, cache = _decode(model, kernels, torch.float32, [3], steps=4)
    assert len(reads) == 1  # (the prompts' chunks of more than 4 rows run the other form)
    norm = model.blocks[1].ffn_norm.weight
    with torch.no_grad():
        norm.data = norm.data * 1.5
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, model.cfg.vocab_size, (3, 1), generator=g)
    with torch.inference_mode():
        step = cache.prepare([list(range(8 * b, 8 * b + 8)) for b in range(3)], [10, 6, 13], 1)
        got = model(tok, cache, step, Output.LAST)
        assert len(reads) == 2
        model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
        want = model(tok, cache, step, Output.LAST)
    assert torch.equal(got, want)
