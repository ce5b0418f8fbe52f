"""The ctypes glue of the C kernels: kernels/aigc_kernels.h against native.ENTRY_POINTS (the one table the library
is typed from), the exported symbols, the statuses raised as KernelError, the callers' scratch buffers (the same
results as the library's own allocations, kept across steps), and the fused decoder reading the model's tensors at
each call (a model cast, or given new weights, after a first decode step decodes as a freshly built one)."""

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
from model_core.lm import CausalLM
from model_core.qmatmul import QuantLinear, QuantWeight
from tests.utils import kernels_for, native_isas, tiny_llama_q4

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
    assert kernels.call("llama_swiglu", x.data_ptr(), y.data_ptr(), 0, 32, 0) == 0  # an empty batch is fine
    # a sequence with more keys than its row table holds
    q, kv, out = torch.zeros(1, 2, 16), torch.zeros(8, 2, 16), torch.zeros(1, 2, 16)
    rows, lens = torch.arange(4).view(1, 4), torch.tensor([5], dtype=torch.int32)
    args = (q.data_ptr(), kv.data_ptr(), rows.data_ptr(), lens.data_ptr(), out.data_ptr(), 1, 2, 1, 16, 4, 0.25)
    args += (0.0, 0, 0, 1)  # softcap, window, act, nthreads
    with pytest.raises(native.KernelError, match="paged_attention_decode .*AIGC_ERR_ARGS"):
        kernels.call("paged_attention_decode", *args)
    assert kernels.call("aigc_cpu_features") == native.cpu_features()  # not a status: never raises


def _layer_case(
    kernels: native.Kernels, dtype: torch.dtype, i8: bool, seed: int
) -> tuple[list[object], list[torch.Tensor], tuple[int, ...]]:
    """Random llama_decode_layer arguments (without the scratch ones), the buffers it writes, and the shapes."""
    from tests.utils import quantized_weight as _quantized

    g = torch.Generator().manual_seed(seed)
    B, C, F, nh, nkv, hs, Tk = 3, 96, 160, 4, 2, 32, 9
    weights = [
        _quantized(qt, n, k, seed + i)[0]
        for i, (qt, (n, k)) in enumerate(
            zip((3, 2, 8, 3), [((nh + 2 * nkv) * hs, C), (C, nh * hs), (2 * F, C), (C, F)])
        )
    ]
    weights = [w.interleave() if i8 else w for w in weights]
    w = (ctypes.c_void_p * 12)(*[None if t is None else t.data_ptr() for q in weights for t in (q.qs, q.d, q.m)])
    x = torch.randn(B, C, generator=g).to(dtype)
    norms = [(1 + 0.1 * torch.randn(C, generator=g)).to(dtype) for _ in range(2)]
    ang = torch.rand(B, hs // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)
    kv = torch.randn(B * Tk + 1, 2 * nkv, hs, generator=g).to(dtype)
    rows = torch.stack([torch.randperm(B * Tk, generator=g)[:Tk] for _ in range(B)])
    lens = torch.tensor([Tk, 5, 1], dtype=torch.int32)
    write = rows[torch.arange(B), (lens - 1).long()].contiguous()
    act = int(dtype == torch.bfloat16)
    args: list[object] = [x, B, C, norms[0], norms[1], 1e-5, w, cos, sin, kv, write, rows, lens, Tk, nh, nkv, hs, F]
    args += [hs**-0.5, 0.0, 0]  # scale, softcap, window
    args += [act, int(i8), 2, weights]  # (weights: kept alive with the call's arguments)
    return args, [x, kv], (B, C, nh, nkv, hs, F, act)


def _ptr(a: object) -> object:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_scratch_gives_what_the_librarys_own_allocations_give(isa: str, dtype: torch.dtype) -> None:
    """llama_decode_layer with scratch NULL (allocated per call) and with a caller's buffer (dirty, and bigger than
    needed): bit-identical outputs; too small a buffer is refused."""
    kernels = kernels_for(isa)
    for i8 in (False, True) if kernels.isa.has_int8 else (False,):
        outs = []
        for scratch in ("none", "dirty"):
            args, written, shapes = _layer_case(kernels, dtype, i8, seed=5)
            need = kernels.call("llama_decode_scratch_bytes", *shapes)
            assert need > 0 and need % 64 == 0
            buf = torch.full((need + 100,), 0xA5, dtype=torch.uint8)
            extra = (None, 0) if scratch == "none" else (buf.data_ptr(), buf.numel())
            kernels.call("llama_decode_layer", *[_ptr(a) for a in args[:-1]], *extra)
            outs.append([t.clone() for t in written])
            if scratch == "dirty":
                with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
                    kernels.call("llama_decode_layer", *[_ptr(a) for a in args[:-1]], buf.data_ptr(), need - 1)
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def _layer_by_entry_points(kernels: native.Kernels, args: list[object]) -> None:
    """What llama_decode_layer does to x and kv, through the library's other entry points (norms, quant_matmul,
    llama_attention with the same scale, softcap and window, SwiGLU, residual adds)."""
    x, B, C, attn_norm, ffn_norm, eps, _, cos, sin, kv, write, rows, lens, Tk, nh, nkv, hs, F = args[:18]
    scale, softcap, window, act, i8, threads, weights = args[18:]
    assert isinstance(x, torch.Tensor) and isinstance(B, int) and isinstance(C, int) and isinstance(F, int)
    assert isinstance(nh, int) and isinstance(nkv, int) and isinstance(hs, int) and isinstance(weights, list)
    call, p = kernels.call, _ptr

    def matmul(inp: torch.Tensor, i: int, N: int, K: int) -> torch.Tensor:
        w, y = weights[i], torch.empty(B, N, dtype=x.dtype)
        m = None if w.m is None else w.m.data_ptr()
        call(
            "quant_matmul",
            inp.data_ptr(),
            act,
            w.qs.data_ptr(),
            w.d.data_ptr(),
            m,
            None,
            y.data_ptr(),
            B,
            N,
            K,
            i8,
            threads,
        )
        return y

    h, att, g = (
        torch.empty(B, C, dtype=x.dtype),
        torch.empty(B, nh * hs, dtype=x.dtype),
        torch.empty(B, F, dtype=x.dtype),
    )
    call("llama_rmsnorm", x.data_ptr(), p(attn_norm), eps, h.data_ptr(), B, C, act)
    qkv = matmul(h, 0, (nh + 2 * nkv) * hs, C)
    ptrs = [p(a) for a in (qkv, B, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs)]
    call("llama_attention", *ptrs, scale, softcap, window, act, threads, None, 0)
    o = matmul(att, 1, C, nh * hs)  # (kept referenced until the call that reads it is done)
    call("llama_add_rmsnorm", x.data_ptr(), o.data_ptr(), p(ffn_norm), eps, h.data_ptr(), B, C, act)
    gu = matmul(h, 2, 2 * F, C)
    call("llama_swiglu", gu.data_ptr(), g.data_ptr(), B, F, act)
    o = matmul(g, 3, C, F)
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
            fused[18:21] = params
            kernels.call("llama_decode_layer", *[_ptr(a) for a in fused[:-1]], None, 0)
            composed, by_entry, _ = _layer_case(kernels, dtype, i8, seed=7)
            composed[18:21] = params
            _layer_by_entry_points(kernels, composed)
            for a, b in zip(written, by_entry):
                assert torch.equal(a, b), f"{params} i8={i8}"
            results[params] = written[0]
        assert not torch.equal(*results.values())
        for bad in [(0.2, -1.0, 0), (0.2, 0.0, -2), (0.2, math.nan, 3)]:
            args, written, _ = _layer_case(kernels, dtype, i8, seed=7)
            before = [t.clone() for t in written]
            args[18:21] = bad
            with pytest.raises(native.KernelError, match="llama_decode_layer .*AIGC_ERR_ARGS"):
                kernels.call("llama_decode_layer", *[_ptr(a) for a in args[:-1]], None, 0)
            assert all(torch.equal(a, b) for a, b in zip(written, before))  # x and the cache untouched


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
            model(p.unsqueeze(0), cache.prepare([tables[b]], [0], len(p)), cache, last_only=True)
        for B in batches:
            for _ in range(steps):
                tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
                pos = cache.prepare(tables[:B], lens[:B], 1)
                if fresh_scratch:
                    cache.scratch = Scratch()
                out.append(model(tok, pos, cache, last_only=True).float().flatten())
                lens[:B] = [n + 1 for n in lens[:B]]
    return torch.cat(out), cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("max_rows", [4, 1])  # one call per layer up to 4 rows; between the matmuls above 1
def test_batches_growing_and_shrinking_reuse_the_caches_scratch(isa: str, max_rows: int) -> None:
    """Decode steps of 1, 4, then 2 rows on one cache: bit for bit the logits of the same steps each with scratch of
    its own (the buffers grown for 4 rows, then serving 2, hold nothing over), and no allocation once the sizes
    have been seen."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(max_rows, kernels, torch.float32)
    assert model.decoder_fast_path is not None
    got, cache = _decode(model, kernels, torch.float32, [1, 4, 2])
    want, _ = _decode(model, kernels, torch.float32, [1, 4, 2], fresh_scratch=True)
    assert torch.equal(got, want)
    grown = cache.scratch.allocations
    assert grown > 0
    with torch.inference_mode():  # more steps of sizes seen before: no new storage
        for B in (4, 1, 2, 4):
            pos = cache.prepare([list(range(8 * b, 8 * b + 8)) for b in range(B)], [20] * B, 1)
            model(torch.zeros(B, 1, dtype=torch.long), pos, cache, last_only=True)
    assert cache.scratch.allocations == grown


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("max_rows", [4, 1])
def test_a_model_cast_after_a_decode_step_decodes_as_a_fresh_decoder(isa: str, max_rows: int) -> None:
    """Decode in fp32, then cast the model to bf16 (new parameter storage, rotary tables, dtype) and decode on a bf16
    cache with the same decoder object: the logits equal those of a decoder built after the cast, bit for bit (no
    fp32 addresses or activation dtype kept from the first call)."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(max_rows, kernels, torch.float32)
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
        pos = cache.prepare([[0]], [0], 1)
        assert not fused.applies(1, cache)
        with pytest.raises(ValueError, match="queries"):
            model(torch.zeros(1, 1, dtype=torch.long), pos, cache)


@pytest.mark.parametrize("isa", ISAS)
def test_new_weights_after_a_decode_step_are_the_ones_used(isa: str) -> None:
    """Replace every layer's quantized weights (new tensors: new addresses) and a norm's parameter after a first
    decode step: the same decoder object gives what one built on the new weights gives, and not the old logits."""
    kernels = kernels_for(isa)
    model = tiny_llama_q4(4, kernels, torch.float32)
    fused = model.decoder_fast_path
    before, _ = _decode(model, kernels, torch.float32, [3])
    other = tiny_llama_q4(4, kernels, torch.float32, seed=1)
    for mine, theirs in zip(model.modules(), other.modules()):
        if isinstance(mine, QuantLinear) and isinstance(theirs, QuantLinear):
            q = theirs.quant
            mine.quant = QuantWeight(q.qs.clone(), q.d.clone(), None if q.m is None else q.m.clone(), q.rows)
            mine.dense = theirs.dense
    with torch.no_grad():
        model.blocks[1].ffn_norm.weight = torch.nn.Parameter(model.blocks[1].ffn_norm.weight * 1.5)
    got, _ = _decode(model, kernels, torch.float32, [3])
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    want, _ = _decode(model, kernels, torch.float32, [3])
    assert torch.equal(got, want) and not torch.equal(got, before)
    model.decoder_fast_path = fused
