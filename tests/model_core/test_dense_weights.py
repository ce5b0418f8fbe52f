"""A GGUF model without dense copies of its quantized layers (load_lm(dense_weights=False), the server's
--dense-weights drop, and what auto picks where the copies would not fit): the kernels dequantize a layer's weights
exactly as gguf does (every kind, both forms, every build); layers keep only their quantized weights, the batches
that ran on the dense copies (prompt chunks, big decode batches, exact prompt logits) run on the weights dequantized
for the call, with the same logits; auto keeps the copies only where they fit the memory available."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_core.backend import select_backend
from model_core.qmatmul import (
    BF16,
    F16,
    GGML_TYPES,
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QuantLinear,
    dequantize_into,
)
from model_core.quant_embedding import QuantEmbedding
from model_core.weights import loader
from model_core.weights.loader import load_lm
from tests.model_core.test_native_kquants import _decode_logits
from tests.utils import kernels_for, kquant_weight, native_isas, quantized_weight

ISAS = native_isas()
ALL_TYPES = [Q4_0, Q4_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, IQ4_NL, IQ4_XS, F16, BF16]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler: the native kernels cannot build here")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_the_kernels_dequantize_as_gguf_does(isa: str, qtype: int) -> None:
    """Row form and interleaved form, fp32 and bf16 (gguf's fp32 rounded to nearest even): bit for bit."""
    kernels = kernels_for(isa)
    make = quantized_weight if GGML_TYPES[qtype].kind.entry == "quant_matmul" else kquant_weight
    qw, want = make(qtype, 37, 512, 3)
    forms = (qw, qw.interleave()) if qw.kind.int8 else (qw,)
    for form in forms:
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_into(form, torch.full((37, 512), float("nan"), dtype=dtype), kernels)
            assert torch.equal(got, want.to(dtype)), (form.interleaved, dtype)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_into(qw, torch.empty(512, 37).t(), kernels)


def _gguf(tmp_path: Path, tie: bool = False) -> Path:
    pytest.importorskip("transformers")
    from tests.model_core.tiny_formats import tiny_hf_llama, tiny_vocab, write_gguf

    hf = tiny_hf_llama(n_kv_heads=2, seed=1, hidden=256, ffn=512, tie=tie)
    return write_gguf(hf, tmp_path / "m.gguf", "Q4_K_M", vocab=tiny_vocab()).path


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tie", [False, True])
def test_without_dense_weights_the_logits_are_the_same(isa: str, tie: bool, tmp_path: Path) -> None:
    """Q4_K matrices and embedding with Q6_K ffn_down and head (or the head tied to the embedding): without dense
    copies no layer holds dense weights (their prompt chunks of up to 11 tokens exceed the 4 rows that run on the
    kernels, and the int8 builds score prompts exactly) and the embedding looks its rows up in its blocks (a tied one
    in the head's); in fp32 every logit equals the dense-copy model's bit for bit (the same weights in the same
    matmul), in bf16 as close as the dense bf16 model is to fp32 (oneDNN's packed copy sums in another order) and the
    same greedy tokens."""
    path = _gguf(tmp_path, tie)
    backend = select_backend(isa)
    want32 = _decode_logits(load_lm(path).model, torch.float32, None)
    for dtype in (torch.float32, torch.bfloat16):
        keep = load_lm(path, dtype, quantized_max_rows=4, backend=backend, dense_weights=True).model
        lean = load_lm(path, dtype, quantized_max_rows=4, backend=backend, dense_weights=False).model
        layers = [m for m in lean.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 4 * lean.cfg.n_layers + 1 and not any(m.has_dense for m in layers)
        assert all(m.has_dense for m in keep.modules() if isinstance(m, QuantLinear))
        assert isinstance(lean.embed, QuantEmbedding) and (lean.embed.quant is lean.lm_head.quant) == tie
        assert all(p.is_meta for n, p in lean.named_parameters() if "norm" not in n)
        a, b = _decode_logits(keep, dtype, backend.kernels), _decode_logits(lean, dtype, backend.kernels)
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            bound = (a - want32).abs().max().item()
            assert (a - b).abs().max().item() <= max(bound, 0.05 * want32.abs().max().item())
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_layer_without_dense_weights_refuses_autograd(tmp_path: Path) -> None:
    lean = load_lm(_gguf(tmp_path), quantized_max_rows=4, backend=select_backend(ISAS[0]), dense_weights=False).model
    layer = next(m for m in lean.modules() if isinstance(m, QuantLinear))
    with pytest.raises(ValueError, match="quantized weights"):
        layer(torch.randn(2, layer.in_features, requires_grad=True))


def test_auto_keeps_dense_weights_where_they_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dense_weights=None: kept where their bytes (twice over where oneDNN packs them) are at most 1 GiB and a
    quarter of the available memory, else the layers keep only their quantized weights."""
    from model_core.weights.gguf import quantized_linear_weights
    from model_core.weights.gguf_reader import open_gguf

    path = _gguf(tmp_path)
    backend = select_backend(ISAS[0])
    n = quantized_linear_weights(open_gguf(path))
    assert n == sum(
        m.in_features * m.out_features for m in load_lm(path).model.modules() if isinstance(m, torch.nn.Linear)
    )
    for available, most, dense in ((64 * n, 1 << 30, True), (4 * n, 1 << 30, False), (64 * n, 3 * n, False)):
        monkeypatch.setattr(loader, "available_memory", lambda a=available: a)
        monkeypatch.setattr(loader, "DENSE_MAX_BYTES", most)
        model = load_lm(path, quantized_max_rows=4, backend=backend, dense_weights=None).model
        assert all(m.has_dense == dense for m in model.modules() if isinstance(m, QuantLinear)), (available, most)


@pytest.mark.parametrize("isa", ISAS)
def test_a_quantized_embedding_looks_up_the_tables_rows(isa: str) -> None:
    """Row form and interleaved (a tied head's copy): the rows nn.Embedding holds for the dequantized table, in any
    id shape; ids out of range are an IndexError."""
    kernels = kernels_for(isa)
    qw, table = kquant_weight(Q4_K, 77, 512, 5)
    ids = torch.tensor([[0, 76, 8, 8], [15, 16, 1, 63]])
    for form in (qw, qw.interleave()):
        for dtype in (torch.float32, torch.bfloat16):
            emb = QuantEmbedding(form, dtype, kernels)
            assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, table.to(dtype)))
            assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 512)
        with pytest.raises(IndexError):
            QuantEmbedding(form, torch.float32, kernels)(torch.tensor([77]))


@pytest.mark.parametrize("isa", ISAS)
def test_without_dense_weights_the_kernels_take_the_lean_rows(isa: str, tmp_path: Path) -> None:
    """Without dense copies every layer (the wide kinds too) runs batches up to the backend's lean_max_rows on its
    kernels: with AMX tiles 64 (they beat dequantizing up to there), else the backend's own quant_max_rows."""
    from model_core import native

    backend = select_backend(isa)
    amx = isa == "avx512bf16" and bool(native.cpu_features() & native.CPU_AMX_BF16)
    assert backend.lean_max_rows == (max(64, backend.quant_max_rows) if amx else backend.quant_max_rows)
    lean = load_lm(_gguf(tmp_path), torch.bfloat16, quantized_max_rows=None, backend=backend, dense_weights=False)
    assert {m.max_rows for m in lean.model.modules() if isinstance(m, QuantLinear)} == {backend.lean_max_rows}
