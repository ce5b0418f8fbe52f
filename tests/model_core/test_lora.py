"""LoRA adapters (model_core.lora, model_core.weights.lora): made with `peft` on a tiny HF llama, read from the PEFT
folder and from llama.cpp's GGUF LoRA (converted by llama.cpp's own convert_lora_to_gguf.py), applied per row
without merging.

- an adapter's logits equal HF transformers' with the adapter merged by peft (fp32, <= 1e-4), greedy tokens
  identical, over a base read from the HF folder and from a GGUF (whose Q/K rows llama.cpp permutes: so are the
  GGUF adapter's B rows);
- a batch mixing base rows and two adapters (rows of different lengths: padding): base rows bit for bit those of
  the same batch without adapters, every row that row run alone (the dense model: <= 1e-5; over quantized bases on
  the native kernels in batch-invariant mode, bit for bit), adapter rows over a quantized base close to the dense
  model's over the same (round-tripped) weights;
- an adapter that does not fit the model is a ValueError naming what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from model_core import lora as lora_module  # noqa: E402
from model_core.backend import select_backend  # noqa: E402
from model_core.generate import generate  # noqa: E402
from model_core.lm import CausalLM, Output  # noqa: E402
from model_core.lora import LoRAAdapter, LoRABatch  # noqa: E402
from model_core.sampling import SamplingParams  # noqa: E402
from model_core.weights.loader import invariance_gap, load_lm  # noqa: E402
from model_core.weights.lora import load_lora  # noqa: E402
from tests.model_core.lora_files import (  # noqa: E402
    ADAPTERS,
    base_model,
    convert_to_gguf,
    find_lora_converter,
    merged,
    write_peft,
)
from tests.model_core.tiny_formats import TinyGGUF, write_gguf, write_hf_dir  # noqa: E402
from tests.utils import native_isas  # noqa: E402

SIMD = native_isas(reference=False)
TOL = 1e-4  # fp32 logits against HF transformers' merged model (they span about -30..30)


@dataclass
class Files:
    hf_dir: Path
    peft: dict[str, Path]
    gguf: dict[str, Path]  # the adapters llama.cpp's converter wrote (empty without the converter)
    bases: dict[str, TinyGGUF]  # base GGUF files by type


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("lora")
    hf_dir = write_hf_dir(base_model(), d / "base")
    peft = {name: write_peft(d / name, name, seed=10 + i) for i, name in enumerate(ADAPTERS)}
    gguf = {}
    script = find_lora_converter()
    if script is not None:
        for name in ("a", "b"):  # (rs: the converter drops use_rslora, llama.cpp scales by alpha / r)
            conv = convert_to_gguf(script, peft[name], hf_dir, d / f"{name}.gguf")
            assert conv.path is not None, conv.log[-3000:]
            gguf[name] = conv.path
    bases = {q: write_gguf(base_model(), d / f"base-{q}.gguf", q) for q in ("F32", "Q8_0", "Q4_0")}
    return Files(hf_dir, peft, gguf, bases)


def _adapter_path(files: Files, name: str, fmt: str) -> Path:
    if fmt == "gguf" and name not in files.gguf:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py is not here (../shared/peers/llama-tools.sh builds it)")
    return files.peft[name] if fmt == "peft" else files.gguf[name]


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy_hf(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(tok)
            out.append(tok)
    return out


@pytest.mark.parametrize("base", ["hf", "gguf"])
@pytest.mark.parametrize(("name", "fmt"), [("a", "peft"), ("a", "gguf"), ("b", "peft"), ("b", "gguf"), ("rs", "peft")])
def test_logits_equal_peft_merged(files: Files, base: str, name: str, fmt: str) -> None:
    lm = load_lm(files.hf_dir if base == "hf" else files.bases["F32"].path, native_decode=False, pack=False)
    adapter = load_lora(_adapter_path(files, name, fmt), lm.config)
    assert adapter.format == fmt and adapter.rank == ADAPTERS[name]["r"]
    oracle = merged(files.peft[name])
    ids = _ids()
    with torch.no_grad():
        want = oracle(ids).logits
        got = lm.model(ids, lora=LoRABatch.of([adapter]))
        plain = lm.model(ids)
    assert (got - want).abs().max().item() <= TOL
    assert (plain - want).abs().max().item() > 1.0  # the adapter matters
    prompt = ids[0, :5].tolist()
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours = [s.token_id for s in generate(lm.model, prompt, greedy, lora=adapter)]
    assert ours == _greedy_hf(oracle, prompt, 12)


def test_gguf_adapter_is_the_peft_adapter(files: Files) -> None:
    """llama.cpp's converter permutes B's rows of q and k as it permutes the base's: read back, the GGUF form is the
    PEFT form (fp32 both)."""
    cfg = load_lm(files.hf_dir, native_decode=False, pack=False).config
    peft = load_lora(files.peft["a"], cfg)
    gguf = load_lora(_adapter_path(files, "a", "gguf"), cfg)
    assert (
        set(peft.layers)
        == set(gguf.layers)
        == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.out", "ffn.w_in", "ffn.w_out")}
    )
    for k, w in peft.layers.items():
        assert torch.allclose(w.a, gguf.layers[k].a, atol=1e-7) and torch.allclose(w.b, gguf.layers[k].b, atol=1e-7)


# --------------------------------------------------------------------------------------------- mixed batches
PROMPTS = [7, 12, 9, 12, 4]  # lengths: rows of different lengths share the prefill (padding)
CHOICE = [None, "a", "b", None, "a"]
STEPS = 4


def _run(model: CausalLM, rows: list[int], adapters: list[LoRAAdapter | None]) -> torch.Tensor:
    """Prefill the PROMPTS of `rows` as one padded forward, then STEPS batched decode steps of fixed tokens, on a
    paged cache, each row with its adapter. Returns (len(rows), 1 + STEPS, V) float32 logits."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPTS]
    decode = torch.randint(3, 300, (len(PROMPTS), STEPS), generator=g)
    prompts, decode = [prompts[r] for r in rows], decode[rows]
    B, T = len(rows), max(len(p) for p in prompts)
    cache = model.new_cache(B * 8, 4)
    tables = [list(range(8 * b, 8 * b + 8)) for b in range(B)]
    lora = LoRABatch.of(adapters)
    with torch.inference_mode():
        tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
        step = cache.prepare(tables, [0] * B, [len(p) for p in prompts])
        out = [model(tokens, cache, step, Output.at(torch.tensor([len(p) - 1 for p in prompts])), lora=lora)]
        for s in range(STEPS):
            step = cache.prepare(tables, [len(p) + s for p in prompts], [1] * B)
            out.append(model(decode[:, s : s + 1], cache, step, Output.LAST, lora=lora))
    return torch.stack(out, 1).float()


def _check_mixed(model: CausalLM, adapters: dict[str, LoRAAdapter], alone_tol: float | None) -> torch.Tensor:
    """The mixed batch's rows against the batch without adapters (base rows: bit for bit) and each row alone
    (alone_tol None: bit for bit). Returns the mixed batch's logits."""
    rows = list(range(len(PROMPTS)))
    choice = [None if c is None else adapters[c] for c in CHOICE]
    mixed = _run(model, rows, choice)
    plain = _run(model, rows, [None] * len(rows))
    for r, c in enumerate(CHOICE):
        if c is None:
            assert torch.equal(mixed[r], plain[r]), f"base row {r} changed by the adapters beside it"
        else:
            assert (mixed[r] - plain[r]).abs().max().item() > 0.5  # its adapter applies
        alone = _run(model, [r], [choice[r]])[0]
        if alone_tol is None:
            assert torch.equal(mixed[r], alone), f"row {r} ({c or 'base'}) differs from its run alone"
        else:
            assert (mixed[r] - alone).abs().max().item() <= alone_tol, f"row {r} ({c or 'base'})"
    return mixed


def test_mixed_batch_dense(files: Files) -> None:
    lm = load_lm(files.hf_dir, native_decode=False, pack=False)
    adapters = {n: load_lora(files.peft[n], lm.config) for n in ("a", "b")}
    _check_mixed(lm.model, adapters, alone_tol=1e-5)  # (dense fp32 matmuls: rows round by their batch's shape)


@pytest.mark.skipif(not SIMD, reason="no native SIMD build runs on this CPU")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("isa", SIMD)
def test_mixed_batch_quantized_batch_invariant(files: Files, isa: str, qtype: str) -> None:
    """A quantized base on the native kernels, batch-invariant (the server's default): every step runs through the
    fused decoder (one call per layer without adapter rows, the projections one by one with them); base rows are
    those without adapters and every row its run alone, bit for bit; adapter rows are close to the dense model's over
    the same weights (the kernels round activations to 16 bits per block)."""
    path = files.bases[qtype].path
    lm = load_lm(path, torch.float32, quantized_max_rows=None, backend=select_backend(isa), batch_invariant=True)
    assert lm.model.batch_invariant and invariance_gap(lm.model) is None
    adapters = {n: load_lora(files.gguf.get(n, files.peft[n]), lm.config) for n in ("a", "b")}  # (GGUF where made)
    mixed = _check_mixed(lm.model, adapters, alone_tol=None)
    dense = load_lm(path, native_decode=False, pack=False)  # the file's (round-tripped) weights, dense fp32
    want = _check_dense(dense.model, adapters)
    assert (mixed - want).abs().max().item() <= 0.01  # (measured <= 1.3e-3; base rows alone 7e-4: the kernels own)


def _check_dense(model: CausalLM, adapters: dict[str, LoRAAdapter]) -> torch.Tensor:
    return _run(model, list(range(len(PROMPTS))), [None if c is None else adapters[c] for c in CHOICE])


@pytest.mark.skipif(not SIMD, reason="no native SIMD build runs on this CPU")
@pytest.mark.parametrize("isa", SIMD)
def test_mixed_batch_quantized_decode_kernels(files: Files, isa: str) -> None:
    """Not batch-invariant (--no-batch-invariant): prompts on dense matmuls, decode steps of up to 8 rows on the
    kernels; the decode steps with adapter rows run the fused layers as projections: base rows still bit for bit
    those without adapters."""
    lm = load_lm(files.bases["Q4_0"].path, torch.float32, quantized_max_rows=8, backend=select_backend(isa))
    assert not lm.model.batch_invariant
    adapters = {n: load_lora(files.peft[n], lm.config) for n in ("a", "b")}
    _check_mixed(lm.model, adapters, alone_tol=1e-4)


@pytest.mark.skipif(not SIMD, reason="no native SIMD build runs on this CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", SIMD)
def test_one_call_layers_add_the_deltas_the_projections_hooks_add(
    files: Files, isa: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the native kernels the fused decoder's one-call layers take the adapter rows (llama_decode_layer adds
    each projection's deltas with lora_add): bit for bit what the layers run projection by projection give, the
    projections' hooks adding the same deltas."""
    path = files.bases["Q4_0"].path
    lm = load_lm(path, dtype, quantized_max_rows=None, backend=select_backend(isa), batch_invariant=True)
    adapters = {n: load_lora(files.peft[n], lm.config) for n in ("a", "b")}
    rows, choice = list(range(len(PROMPTS))), [None if c is None else adapters[c] for c in CHOICE]
    calls: list[str] = []
    call = lm.model.kernels.call  # type: ignore[union-attr]

    def counted(name: str, *args: object, **kwargs: str) -> int:
        calls.append(name)
        return call(name, *args, **kwargs)

    monkeypatch.setattr(lm.model.kernels, "call", counted)
    fused = _run(lm.model, rows, choice)
    assert "llama_decode_layers" in calls and "lora_add" not in calls  # (the deltas inside the layers)
    calls.clear()
    monkeypatch.setattr(lora_module, "native", lambda: False)  # the fused decoder's other form
    by_projection = _run(lm.model, rows, choice)
    assert "llama_decode_layers" not in calls and "lora_add" in calls
    assert torch.equal(fused, by_projection)


# --------------------------------------------------------------------------------------------- validation
def test_adapter_of_another_model_is_refused(files: Files, tmp_path: Path) -> None:
    from tests.model_core.tiny_formats import tiny_hf_llama

    other = write_hf_dir(tiny_hf_llama(seed=0, hidden=96, n_heads=6, n_kv_heads=2, ffn=128), tmp_path / "wide")
    cfg = load_lm(other, native_decode=False, pack=False).config
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight.*is 96x128"):
        load_lora(files.peft["a"], cfg)


def test_bad_adapters_are_refused(files: Files, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = load_lm(files.hf_dir, native_decode=False, pack=False).config
    src = files.peft["b"]
    tensors = load_file(str(src / "adapter_model.safetensors"))
    conf = json.loads((src / "adapter_config.json").read_text())

    def variant(name: str, tensors: dict[str, torch.Tensor], **conf_changes: object) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({**conf, **conf_changes}))
        return d

    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    half = {k: v for k, v in tensors.items() if k != q_a}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight.*lacks its lora_A"):
        load_lora(variant("half", half), cfg)
    head = {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    head["base_model.model.lm_head.lora_B.weight"] = torch.zeros(300, 4)
    with pytest.raises(ValueError, match=r"targets 'lm_head.weight'.*not to embeddings, the LM head"):
        load_lora(variant("head", head), cfg)
    deep = {k.replace("layers.0.", "layers.5."): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"targets 'model.layers.5"):
        load_lora(variant("deep", deep), cfg)
    with pytest.raises(ValueError, match=r"use_dora=True is not supported"):
        load_lora(variant("dora", tensors, use_dora=True), cfg)
    with pytest.raises(ValueError, match=r"is not a GGUF LoRA adapter"):
        load_lora(files.bases["F32"].path, cfg)
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "nowhere", cfg)
