"""F16 and BF16 GGUF weights on the native kernels, as stored (2 bytes a weight, the file's own values): every build
this CPU runs (NEON under emulation in test_native_neon.py), fp32 and bf16 activations. Their products are exact
(fp32 sums of the exact weights) in either matmul mode: builds whose matmuls default to int8 activations keep them in
row form, and a layer's one-call decode mixes them with int8-mode quantized projections. A tiny llama GGUF in F16 and
in BF16 loads with every projection and the head on the kernels and decodes as the dequantized model does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_core import native
from model_core.backend import select_backend
from model_core.qmatmul import BF16, F16, GGML_TYPES, KIND_BF16, KIND_F16, QuantLinear, attach_quantized, qmatmul
from tests.model_core.test_native_kquants import _decode_logits
from tests.utils import kernels_for, kquant_weight, native_isas

ISAS = native_isas()
DTYPES = [torch.float32, torch.bfloat16]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler: the native kernels cannot build here")


@pytest.mark.parametrize("qtype", [F16, BF16])
def test_float_weights_are_the_files_values_at_the_files_size(qtype: int) -> None:
    qw, ref = kquant_weight(qtype, 24, 160, seed=qtype)
    assert qw.kind == GGML_TYPES[qtype].kind and (qw.out_features, qw.in_features) == (24, 160)
    assert torch.equal(qw.dequantize(), ref) and qw.nbytes == 24 * 160 * 2
    with pytest.raises(ValueError, match="no int8 mode"):
        qw.interleave()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=15, deadline=None)
@given(
    qtype=st.sampled_from([F16, BF16]),
    m=st.integers(1, 19),
    n=st.integers(1, 40),
    nb=st.integers(1, 24),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float_weight_matmul_is_the_exact_product_in_either_mode(
    isa: str, dtype: torch.dtype, qtype: int, m: int, n: int, nb: int, bias: bool, seed: int
) -> None:
    """x W^T with the file's weights up to fp32 summation order (bf16: plus the output's rounding); i8 = 1 gives the
    same result (the float kinds ignore it)."""
    qw, w = kquant_weight(qtype, n, 32 * nb, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 32 * nb, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    kernels = kernels_for(isa)
    got = qmatmul(x, qw, kernels, b)
    ref = x.float() @ w.T + (0 if b is None else b)
    order = 1e-5 * math.sqrt(x.shape[-1]) * (x.float().abs().max() * w.abs().max())
    tol = (2**-8 if dtype == torch.bfloat16 else 1e-6) * ref.abs() + order
    assert ((got.float() - ref).abs() <= tol).all()
    if kernels.isa.has_int8:
        y = torch.empty(m, n, dtype=dtype)
        kernels.call(
            "quant_matmul_kind", x.data_ptr(), int(dtype == torch.bfloat16), qw.kind.value, qw.qs.data_ptr(), None,
            None, None if b is None else b.data_ptr(), y.data_ptr(), m, n, 32 * nb, 1, 1,
        )  # fmt: skip
        assert torch.equal(y, got)


@pytest.mark.parametrize("isa", ISAS)
def test_float_kinds_check_their_arguments_and_stay_in_row_form(isa: str) -> None:
    """K not a multiple of 32 or no weights: AIGC_ERR_ARGS (d and m are not needed); attach_quantized keeps them in
    row form in every build, also where the build's matmuls default to int8 activations."""
    kernels = kernels_for(isa)
    qw, w = kquant_weight(F16, 8, 64, seed=1)
    x = torch.randn(2, 64)
    y = torch.empty(2, 8)
    for k, qs in ((48, qw.qs.data_ptr()), (64, None)):
        with pytest.raises(native.KernelError, match="AIGC_ERR_ARGS"):
            kernels.call("quant_matmul_kind", x.data_ptr(), 0, KIND_F16.value, qs, None, None, None, y.data_ptr(),
                         2, 8, k, 0, 1)  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False))
    model[0].weight.data = w
    assert attach_quantized(model, {"0": qw}, 8, kernels) == 1
    layer = model[0]
    assert isinstance(layer, QuantLinear) and not layer.quant.interleaved
    with torch.inference_mode():
        ref = x @ w.T
        assert (layer(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_gguf_loads_as_stored_and_decodes_as_the_dequantized_model(isa: str, qtype: str, tmp_path: Path) -> None:
    """Every projection and the head run on their F16/BF16 weights as stored (the fused decoder's one-call layers
    too): fp32 logits equal the fp32 modules' up to summation order in every build (exact products, also where the
    matmuls of quantized weights default to int8 activations); bf16 ones are as close as the dense bf16 model's."""
    pytest.importorskip("transformers")
    from model_core.weights.loader import load_lm
    from tests.model_core.tiny_formats import tiny_hf_llama, tiny_vocab, write_gguf

    hf = tiny_hf_llama(n_kv_heads=2, seed=3, hidden=64, ffn=96)
    path = write_gguf(hf, tmp_path / "m.gguf", qtype, vocab=tiny_vocab()).path
    kind = KIND_F16 if qtype == "F16" else KIND_BF16
    backend = select_backend(isa)
    ref = load_lm(path).model
    want = _decode_logits(ref, torch.float32, None)
    scale = want.abs().max().item()
    err_dense = (_decode_logits(load_lm(path, torch.bfloat16).model, torch.bfloat16, None) - want).abs().max().item()
    for dtype in DTYPES:
        fast = load_lm(path, dtype, quantized_max_rows=8, backend=backend).model
        wrapped = {n: m for n, m in fast.named_modules() if isinstance(m, QuantLinear)}
        assert len(wrapped) == 4 * ref.cfg.n_layers + 1
        for name, layer in wrapped.items():
            assert layer.quant.kind == kind and not layer.quant.interleaved, name
            assert torch.equal(layer.quant.dequantize(), ref.get_submodule(name).weight), name
        fused = fast.decoder_fast_path
        wide = min(8, backend.kernels.isa.wide_max_rows) if backend.kernels else 8  # (16-bit weights: the ISA's cap)
        assert fused is not None and fused.max_rows == wide
        err = (_decode_logits(fast, dtype, backend.kernels) - want).abs().max().item()
        print(f"{isa} {qtype} {dtype}: max |logit - fp32 modules| kernels {err:.2e}, dense bf16 {err_dense:.2e}")
        if dtype == torch.float32:
            assert err <= 1e-4 * max(scale, 1.0)
        else:
            assert err <= max(1.5 * err_dense, 0.05 * scale)
