"""The C kernels against PyTorch references: the quantized matmul (GGUF Q4_0/Q4_1/Q8_0 blocks) against the
dequantized weights, decode attention from the paged cache against gather + attention, a GGUF model
with both kernels against the same model without them, and the fallback where they cannot build."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from model_core import native
from model_core.attention import scaled_dot_product_attention
from model_core.kv_cache import PagedKVCache
from model_core.lm import CausalLM
from model_core.qmatmul import Q4_0, Q4_1, Q8_0, QuantLinear, QuantWeight, qmatmul

pytestmark = pytest.mark.skipif(native.load_library() is None,
                                reason="native kernels need gcc and an AVX-512 (BF16) CPU")

QTYPES = {Q4_0: gguf.GGMLQuantizationType.Q4_0, Q4_1: gguf.GGMLQuantizationType.Q4_1,
          Q8_0: gguf.GGMLQuantizationType.Q8_0}


def _quantized(qtype: int, n: int, k: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A random (n, k) weight stored as GGML blocks, and what GGUF readers dequantize it to (float32)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.2
    raw = quantize(w, QTYPES[qtype])
    ref = torch.from_numpy(np.asarray(dequantize(raw, QTYPES[qtype]), dtype=np.float32).reshape(n, k))
    return QuantWeight.from_ggml(qtype, torch.from_numpy(np.ascontiguousarray(raw))), ref


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
def test_repacked_weights_dequantize_like_gguf(qtype: int) -> None:
    qw, ref = _quantized(qtype, 48, 96, seed=qtype)
    assert torch.equal(qw.dequantize(), ref)


@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from([Q4_0, Q4_1, Q8_0]), m=st.integers(1, 13), n=st.integers(1, 70),
       nb=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_qmatmul_is_the_product_with_the_files_weights(qtype: int, m: int, n: int, nb: int, bias: bool,
                                                       seed: int) -> None:
    qw, w = _quantized(qtype, n, 32 * nb, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 32 * nb, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    got = qmatmul(x, qw, b).float()
    ref = x.float() @ w.T + (0 if b is None else b)  # exact weights, float32
    # only the fp32 summation order and the final bf16 rounding (half an ulp, 2^-9 relative) differ
    tol = 2**-8 * ref.abs() + 1e-5 * math.sqrt(32 * nb) * (x.float().abs().max() * w.abs().max())
    assert ((got - ref).abs() <= tol).all(), (got - ref).abs().max()


def test_qmatmul_keeps_leading_dims_and_checks_arguments() -> None:
    qw, w = _quantized(Q4_1, 8, 64, seed=3)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    assert qmatmul(x, qw).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="features"):
        qmatmul(torch.randn(1, 32).to(torch.bfloat16), qw)
    with pytest.raises(ValueError, match="bfloat16"):
        qmatmul(torch.randn(1, 64), qw)
    with pytest.raises(ValueError, match="GGML type"):
        QuantWeight.from_ggml(12, torch.zeros(4, 144, dtype=torch.uint8))  # Q4_K: no kernel


def test_quant_linear_uses_the_kernel_only_for_small_bf16_batches() -> None:
    qw, w = _quantized(Q4_1, 16, 64, seed=4)
    dense = torch.nn.Linear(64, 16, bias=False)
    dense.weight.data = (w + 1.0).to(torch.bfloat16)  # deliberately different: shows which path ran
    layer = QuantLinear(dense, qw, max_rows=4)
    with torch.inference_mode():
        small, big = torch.randn(4, 64).to(torch.bfloat16), torch.randn(5, 64).to(torch.bfloat16)
        assert torch.equal(layer(small), qmatmul(small, qw))
        assert torch.equal(layer(big), dense(big))
        dense32 = torch.nn.Linear(64, 16, bias=False)
        x32 = torch.randn(2, 64)
        assert torch.equal(QuantLinear(dense32, qw, max_rows=4)(x32), dense32(x32))  # fp32: dense


def _paged_case(dtype: torch.dtype, nh: int, nkv: int, hs: int, lens: list[int], seed: int
                ) -> tuple[PagedKVCache, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bs = 4
    per_seq = max(lens) // bs + 1
    cache = PagedKVCache(2, per_seq * len(lens), bs, nkv, hs, dtype)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    perm = torch.randperm(per_seq * len(lens), generator=g).tolist()  # scattered blocks
    tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(len(lens))]
    cache.prepare(tables, [n - 1 for n in lens], 1)
    q = torch.randn(len(lens), 1, nh, hs, generator=g).to(dtype)
    kv = torch.randn(len(lens), 1, 2 * nkv, hs, generator=g).to(dtype)
    return cache, q, kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,hs,lens", [(9, 3, 64, [1, 7, 33, 4, 30]), (4, 4, 16, [17]),
                                            (8, 2, 128, [2, 64, 65]), (2, 1, 32, [300, 1])])
def test_decode_attention_from_paged_rows_equals_gather_then_attention(
        dtype: torch.dtype, nh: int, nkv: int, hs: int, lens: list[int]) -> None:
    cache, q, kv = _paged_case(dtype, nh, nkv, hs, lens, seed=len(lens) + hs)
    assert cache.attends_in_place
    got = cache.attend(1, q, kv)  # (B, 1, nh, hs)
    cache.attends_in_place = False  # the reference: gather the rows (the new K/V are already written)
    k, v = cache.update_fused(1, kv)
    ref = scaled_dot_product_attention(q.transpose(1, 2).float(), k.float(), v.float(), mask=cache.mask)
    err = (got.transpose(1, 2).float() - ref).abs().max().item()
    assert err <= (1e-5 if dtype == torch.float32 else 2**-8 * max(ref.abs().max().item(), 1.0)), err


def test_attention_kernel_is_not_used_where_it_does_not_apply() -> None:
    cache = PagedKVCache(1, 8, 4, 2, 8, torch.float32)  # head size 8: not a multiple of 16
    cache.prepare([[0, 1]], [3], 1)
    assert not cache.attends_in_place
    cache = PagedKVCache(1, 8, 4, 2, 16, torch.float32)
    cache.prepare([[0, 1]], [0], 3)  # a prompt chunk, not a decode step
    assert not cache.attends_in_place
    cache.prepare([[0, 1]], [3], 1)
    assert cache.attends_in_place


def _tiny_gguf(kind: str, qtype: str, tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    from tests.model_core.tiny_formats import tiny_hf_gpt2, tiny_hf_llama, tiny_vocab, write_gguf

    hf = tiny_hf_llama(n_kv_heads=2, seed=1) if kind == "llama" else tiny_hf_gpt2(seed=4)
    return write_gguf(hf, tmp_path / "m.gguf", qtype, vocab=tiny_vocab()).path


def _decode_logits(model: CausalLM, dtype: torch.dtype) -> torch.Tensor:
    """Prefill 3 prompts one by one, then 6 batched decode steps of the 3 rows (fixed tokens).
    Returns the 3 + 18 logits rows, float32."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 11, 3)]
    steps = torch.randint(0, cfg.vocab_size, (6, 3), generator=g)
    cache = PagedKVCache(cfg.n_layers, 24, 4, cfg.n_kv_heads, cfg.hd, dtype)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    out = []
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            pos = cache.prepare([tables[b]], [0], len(p))
            out.append(model(p.unsqueeze(0), pos, cache, last_only=True).float()[0])
        lens = [len(p) for p in prompts]
        for tok in steps:
            pos = cache.prepare(tables, lens, 1)
            out.extend(model(tok.view(3, 1), pos, cache, last_only=True).float())  # (3, V)
            lens = [n + 1 for n in lens]
    return torch.stack(out)


@pytest.mark.parametrize("kind,qtype", [("llama", "Q4_1"), ("llama", "Q4_0"), ("llama", "Q8_0"), ("gpt2", "Q4_1")])
def test_gguf_model_with_kernels_matches_without(kind: str, qtype: str, tmp_path: Path) -> None:
    """Load a tiny quantized GGUF three ways: fp32 (the reference), bf16 modules, bf16 with the kernels. The
    kernels' model has the file's weights exactly, so it is at least as close to fp32 as the dense one,
    and its quantized layers are the file's rows in our order (same as the dequantized dense weights)."""
    from model_core.weights.loader import load_lm

    path = _tiny_gguf(kind, qtype, tmp_path)
    ref = load_lm(path).model
    fast = load_lm(path, torch.bfloat16, quantized_max_rows=8).model
    wrapped = {n: m for n, m in fast.named_modules() if isinstance(m, QuantLinear)}
    assert len(wrapped) == 4 * ref.cfg.n_layers + 1  # the head (output.weight) is quantized too
    for name, layer in wrapped.items():
        assert torch.equal(layer.quant.dequantize(), ref.get_submodule(name).weight), name
    assert (fast.decoder_fast_path is not None) == (kind == "llama")  # the fused decoder runs llama layers

    want = _decode_logits(ref, torch.float32)
    err_fast = (_decode_logits(fast, torch.bfloat16) - want).abs().max().item()
    modules = load_lm(path, torch.bfloat16, native_decode=False).model
    err_dense = (_decode_logits(modules, torch.bfloat16) - want).abs().max().item()
    print(f"{kind} {qtype}: max |logit - fp32| kernels {err_fast:.3f}, dense bf16 modules {err_dense:.3f}")
    assert err_fast <= max(1.5 * err_dense, 0.05 * want.abs().max().item())


@pytest.mark.parametrize("max_rows,one_call", [(8, True), (2, False), (0, False)])
def test_fused_decoder_matches_the_module_path(max_rows: int, one_call: bool, tmp_path: Path) -> None:
    """Decode steps of 3 sequences: one native call per layer (4-bit, B <= max_rows), or native calls
    between PyTorch's matmuls (B > max_rows, or no 4-bit weights), against the same model's modules."""
    from model_core.weights.loader import load_lm

    model = load_lm(_tiny_gguf("llama", "Q4_1", tmp_path), torch.bfloat16, quantized_max_rows=max_rows).model
    fused = model.decoder_fast_path
    assert fused is not None and (fused.max_rows >= 3) == one_call  # type: ignore[attr-defined]
    got = _decode_logits(model, torch.bfloat16)
    model.decoder_fast_path = None
    want = _decode_logits(model, torch.bfloat16)
    diff = (got - want).abs().max().item()
    print(f"fused decode ({'one call per layer' if one_call else 'between matmuls'}) vs modules: max |diff| {diff:.3f}")
    assert torch.equal(got[:3], want[:3])  # prefill: the module path both times
    assert diff <= 0.03 * want.abs().max().item()


def test_one_call_decode_is_independent_of_the_batch() -> None:
    """Each sequence's row goes through the one-call layers on its own (norms, matmul rows, attention per
    sequence), so decoding 4 sequences together gives bit-identical logits to decoding each alone."""
    from tests.conftest import tiny_llama_q4

    model = tiny_llama_q4(max_rows=4)
    assert model.decoder_fast_path is not None
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 1, 30, 12)]
    steps = torch.randint(0, cfg.vocab_size, (5, 4), generator=g)
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(4)]

    def run(groups: list[list[int]]) -> torch.Tensor:
        cache = PagedKVCache(cfg.n_layers, 16, 16, cfg.n_kv_heads, cfg.hd, torch.bfloat16)
        out = torch.empty(5, 4, cfg.vocab_size)
        with torch.inference_mode():
            for b, p in enumerate(prompts):
                model(p.unsqueeze(0), cache.prepare([tables[b]], [0], len(p)), cache, last_only=True)
            for t, tok in enumerate(steps):
                for rows in groups:
                    pos = cache.prepare([tables[b] for b in rows], [len(prompts[b]) + t for b in rows], 1)
                    out[t, rows] = model(tok[rows].view(-1, 1), pos, cache, last_only=True).float()
        return out

    assert torch.equal(run([[0, 1, 2, 3]]), run([[0], [1], [2], [3]]))
    assert torch.equal(run([[0, 1, 2, 3]]), run([[3, 1], [0, 2]]))


def test_no_compiler_means_no_kernel_and_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    native.load_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="model_core.native"):
            assert native.load_library() is None
        assert "build failed" in caplog.text
        monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
        monkeypatch.delenv("CC")
        native.load_library.cache_clear()
        assert native.load_library() is None
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
    finally:
        native.load_library.cache_clear()
