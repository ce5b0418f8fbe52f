"""Weight loaders: tiny random llama / GPT-2 models written as HF safetensors directories and as GGUF
files (F32, F16, BF16, Q8_0, Q4_0, Q4_1) load into logits equal to Hugging Face transformers' on the
same weights; the llama Q/K permutation agrees with HF's own GGUF loader; bad files fail by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from model_core.lm import CausalLM  # noqa: E402
from model_core.weights.build import build_lm  # noqa: E402
from model_core.weights.gguf import config_from_metadata, dequantize_tensor, load_gguf  # noqa: E402
from model_core.weights.gguf_reader import open_gguf, read_metadata  # noqa: E402
from model_core.weights.loader import load_lm  # noqa: E402
from model_core.weights.names import MissingTensorError, permute_rope_rows, unpermute_rope_rows  # noqa: E402
from model_core.weights.safetensors import config_from_hf, load_safetensors_dir  # noqa: E402
from tests.model_core.tiny_formats import (  # noqa: E402
    QTYPES,
    VOCAB_SIZE,
    TinyVocab,
    hf_with_state,
    tiny_hf_gpt2,
    tiny_hf_llama,
    tiny_vocab,
    write_gguf,
    write_hf_dir,
)

TOL = 1e-4
MODELS = {
    "llama": lambda: tiny_hf_llama(n_kv_heads=2, tie=False, seed=1),  # GQA, separate head
    "llama_tied_mqa": lambda: tiny_hf_llama(n_kv_heads=1, tie=True, seed=2, rope_theta=500.0),
    "llama_mha": lambda: tiny_hf_llama(n_kv_heads=4, tie=False, seed=3),
    "gpt2": lambda: tiny_hf_gpt2(seed=4),
}


@pytest.fixture(scope="module")
def vocab() -> TinyVocab:
    return tiny_vocab()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids)
    return getattr(out, "logits", out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("kind", list(MODELS))
def test_safetensors_matches_hf(kind: str, vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    hf = MODELS[kind]()
    path = write_hf_dir(hf, tmp_path / kind, vocab)
    lm = load_lm(path)
    c = hf.config
    assert lm.config.arch == c.model_type and lm.config.vocab_size == VOCAB_SIZE
    assert lm.config.tie_embeddings == c.tie_word_embeddings
    if c.model_type == "llama":
        assert (lm.config.n_heads, lm.config.n_kv_heads) == (c.num_attention_heads, c.num_key_value_heads)
        assert lm.config.rope_theta == c.rope_parameters["rope_theta"]
    if c.tie_word_embeddings:
        assert lm.model.lm_head.weight is lm.model.embed.weight
    diff = _max_diff(_logits(lm.model, ids), _logits(hf, ids))
    print(f"{kind} safetensors vs HF: max abs diff {diff:.2e}")
    assert diff <= TOL
    text = "hello world, the quick model"
    assert lm.tokenizer.encode(text) == json_tokenizer_encode(path, text)


def json_tokenizer_encode(path: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer as Backend

    return Backend.from_file(str(path / "tokenizer.json")).encode(text).ids


def test_sharded_safetensors_and_low_level(vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    hf = MODELS["llama"]()
    path = write_hf_dir(hf, tmp_path / "sharded", vocab, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    cfg, sd, raw = load_safetensors_dir(path)
    assert raw["model_type"] == "llama" and cfg.n_kv_heads == 2 and not cfg.tie_embeddings
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(sd["blocks.1.attn.qkv.weight"][: q.shape[0]], q.detach())
    model = build_lm(cfg, sd)
    assert _max_diff(_logits(model, ids), _logits(hf, ids)) <= TOL


# -------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind", ["llama", "llama_tied_mqa", "gpt2"])
def test_gguf_matches_hf(kind: str, qtype: str, vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    hf = MODELS[kind]()
    tiny = write_gguf(hf, tmp_path / f"{kind}.{qtype}.gguf", qtype, vocab=vocab)
    # our dequantization of every stored tensor equals gguf's dequantize of the bytes we wrote
    file = open_gguf(tiny.path)
    assert set(file.tensor_names) == set(tiny.written)
    for t in file.tensors:
        data, qt = tiny.written[t.name]
        assert t.tensor_type == qt
        ref = np.asarray(gguf.quants.dequantize(data, qt), dtype=np.float32)
        got = dequantize_tensor(t)
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), ref.reshape(got.shape)), t.name
        if t.name == "token_embd.weight":
            assert tuple(got.shape) == (VOCAB_SIZE, 64)
    if qtype == "F32":  # the file stores the original weights exactly
        for k, v in hf.state_dict().items():
            assert torch.equal(tiny.hf_state[k], v.float()), k
    lm = load_lm(tiny.path)
    assert lm.name == f"{kind}.{qtype}"
    assert lm.config.tie_embeddings == ("output.weight" not in tiny.written)
    reference = hf_with_state(hf, tiny.hf_state)
    diff = _max_diff(_logits(lm.model, ids), _logits(reference, ids))
    print(f"{kind} GGUF {qtype} vs HF on the dequantized weights: max abs diff {diff:.2e}")
    assert diff <= TOL
    # the tokenizer came from the GGUF metadata
    tok = lm.tokenizer
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (VOCAB_SIZE, vocab.bos_id, vocab.eos_id)
    assert tok.encode("hello world, the quick model") == _backend_ids(vocab, "hello world, the quick model")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def _backend_ids(vocab: TinyVocab, text: str) -> list[int]:
    from tokenizers import Tokenizer as Backend

    return Backend.from_str(vocab.backend_json).encode(text).ids


def test_gguf_low_level(vocab: TinyVocab, tmp_path: Path) -> None:
    hf = MODELS["llama"]()
    tiny = write_gguf(hf, tmp_path / "m.gguf", "Q8_0", vocab=vocab)
    cfg, sd, meta = load_gguf(tiny.path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    got = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.max_seq_len)
    assert got == (2, 64, 4, 2, 128, 128)
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.rope_theta == 10000.0 and cfg.head_dim is None
    # our state dict holds the un-permuted Q/K rows: equal to HF's layout of the same stored weights
    k_hf = tiny.hf_state["model.layers.0.self_attn.k_proj.weight"]
    q_rows = cfg.n_heads * cfg.hd
    assert torch.equal(sd["blocks.0.attn.qkv.weight"][q_rows : q_rows + k_hf.shape[0]], k_hf)
    # vocab size falls back to the token list when the metadata lacks it
    md = read_metadata(tiny.path)
    del md["llama.vocab_size"]
    assert config_from_metadata(md).vocab_size == VOCAB_SIZE


def test_gpt2_gguf_without_output_tensor_ties_the_head(vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    hf = MODELS["gpt2"]()
    tiny = write_gguf(hf, tmp_path / "g.gguf", "Q4_1", vocab=vocab, gpt2_output=False)
    assert "output.weight" not in tiny.written
    lm = load_lm(tiny.path, pack=False)
    assert lm.config.tie_embeddings and lm.model.lm_head.weight is lm.model.embed.weight
    assert _max_diff(_logits(lm.model, ids), _logits(hf_with_state(hf, tiny.hf_state), ids)) <= TOL


@pytest.mark.parametrize("kind,qtype", [("llama", "F32"), ("llama_tied_mqa", "Q4_1"), ("gpt2", "Q8_0")])
def test_hf_gguf_loader_agrees(kind: str, qtype: str, vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    """HF's own GGUF reader (with its own Q/K un-permutation) gives our logits: an independent check."""
    from transformers import AutoModelForCausalLM

    # HF sizes GPT-2's position table from its default n_positions (1024), not the GGUF context length
    hf = tiny_hf_gpt2(seed=4, max_pos=1024) if kind == "gpt2" else MODELS[kind]()
    tiny = write_gguf(hf, tmp_path / "m.gguf", qtype, vocab=vocab)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=tiny.path.name, dtype=torch.float32)
    ours = load_lm(tiny.path).model
    diff = _max_diff(_logits(ours, ids), _logits(theirs.eval(), ids))
    print(f"{kind} GGUF {qtype}: ours vs HF's GGUF loader max abs diff {diff:.2e}")
    assert diff <= TOL


def test_rope_permutation_is_llama_cpps() -> None:
    """permute_rope_rows interleaves each head's two halves, row by row, like llama.cpp's converter."""
    n_heads, hs, cols = 3, 8, 5
    w = torch.randn(n_heads * hs, cols)
    expected = torch.empty_like(w)
    for h in range(n_heads):
        for i in range(hs // 2):
            expected[h * hs + 2 * i] = w[h * hs + i]
            expected[h * hs + 2 * i + 1] = w[h * hs + hs // 2 + i]
    assert torch.equal(permute_rope_rows(w, n_heads), expected)
    assert torch.equal(unpermute_rope_rows(expected, n_heads), w)
    b = torch.randn(n_heads * hs)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(b, n_heads), n_heads), b)


def test_gguf_without_unpermute_differs(vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    """The permutation matters: reading the stored Q/K rows as they are gives other logits."""
    hf = MODELS["llama"]()
    tiny = write_gguf(hf, tmp_path / "m.gguf", "F32", vocab=vocab)
    cfg, sd, _ = load_gguf(tiny.path)
    good = build_lm(cfg, dict(sd))
    q_rows, kv_rows = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd
    for i in range(cfg.n_layers):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [
                permute_rope_rows(w[:q_rows], cfg.n_heads),
                permute_rope_rows(w[q_rows : q_rows + kv_rows], cfg.n_kv_heads),
                w[q_rows + kv_rows :],
            ]
        )
    bad = build_lm(cfg, sd)
    assert _max_diff(_logits(good, ids), _logits(bad, ids)) > 0.1


@pytest.mark.parametrize("pack", [False, True])
def test_bf16_load_keeps_ties_and_dtype(pack: bool, vocab: TinyVocab, ids: torch.Tensor, tmp_path: Path) -> None:
    hf = MODELS["llama_tied_mqa"]()
    tiny = write_gguf(hf, tmp_path / "m.gguf", "F32", vocab=vocab)
    lm = load_lm(tiny.path, torch.bfloat16, pack=pack)
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    if pack:  # a packed head keeps the embedding as its reference weight
        assert lm.model.lm_head.weight.data_ptr() == lm.model.embed.weight.data_ptr()
    else:
        assert lm.model.lm_head.weight is lm.model.embed.weight
    out = _logits(lm.model, ids)
    ref = _logits(hf, ids)
    assert out.dtype == torch.bfloat16
    agree = (out.float().argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9 and _max_diff(out, ref) < 0.1 * float(ref.abs().max())


# -------------------------------------------------------------------- errors
def test_unknown_architecture_is_named(vocab: TinyVocab, tmp_path: Path) -> None:
    tiny = write_gguf(MODELS["llama"](), tmp_path / "m.gguf", "F32", vocab=vocab, arch="mamba")
    with pytest.raises(ValueError, match="'mamba'"):
        load_gguf(tiny.path)
    with pytest.raises(ValueError, match="'mamba'"):
        load_lm(tiny.path)
    with pytest.raises(ValueError, match="'mamba'"):
        config_from_hf({"model_type": "mamba"})


def test_missing_gguf_tensor_is_named(vocab: TinyVocab, tmp_path: Path) -> None:
    for kind, name in [("llama", "blk.1.ffn_up.weight"), ("gpt2", "blk.0.attn_qkv.bias")]:
        tiny = write_gguf(MODELS[kind](), tmp_path / f"{kind}.gguf", "Q8_0", vocab=vocab, drop={name})
        with pytest.raises(ValueError, match=f"missing tensor '{name}'") as e:
            load_lm(tiny.path)
        assert isinstance(e.value, MissingTensorError) and isinstance(e.value, KeyError)


def test_missing_safetensors_tensor_is_named(vocab: TinyVocab, tmp_path: Path) -> None:
    path = write_hf_dir(MODELS["gpt2"](), tmp_path / "g", vocab)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="'transformer.h.1.mlp.c_fc.weight'"):
        load_lm(path)


def test_shape_mismatch_names_tensor_and_shapes(vocab: TinyVocab, tmp_path: Path) -> None:
    bad_k = np.zeros((48, 64), dtype=np.float32)  # 3 KV heads' rows where the metadata says 2
    tiny = write_gguf(
        MODELS["llama"](), tmp_path / "k.gguf", "F16", vocab=vocab, replace={"blk.0.attn_k.weight": bad_k}
    )
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(48, 64\).*\(32, 64\)"):
        load_lm(tiny.path)
    bad_pos = np.zeros((64, 64), dtype=np.float32)  # fewer positions than the context length
    tiny = write_gguf(
        MODELS["gpt2"](), tmp_path / "p.gguf", "F32", vocab=vocab, replace={"position_embd.weight": bad_pos}
    )
    with pytest.raises(ValueError, match=r"'position_embd\.weight' has shape \(64, 64\).*\(128, 64\)"):
        load_lm(tiny.path)
    path = write_hf_dir(MODELS["llama"](), tmp_path / "hf", vocab)
    st = load_file(str(path / "model.safetensors"))
    st["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 96)
    save_file(st, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has shape \(64, 96\).*\(64, 128"):
        load_lm(path)


def test_unused_tensors_are_an_error(vocab: TinyVocab, tmp_path: Path) -> None:
    """Attention biases in a llama file would change the logits: refuse them."""
    tiny = write_gguf(
        MODELS["llama"](),
        tmp_path / "m.gguf",
        "F32",
        vocab=vocab,
        extra={"blk.0.attn_q.bias": np.ones(64, dtype=np.float32)},
    )
    with pytest.raises(ValueError, match="blk.0.attn_q.bias"):
        load_lm(tiny.path)
    path = write_hf_dir(MODELS["llama"](), tmp_path / "hf", vocab)
    st = load_file(str(path / "model.safetensors"))
    st["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # an old buffer: ignored
    save_file(st, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"\['model\.layers\.0\.self_attn\.q_proj\.bias'\]"):
        load_lm(path)


def test_untied_config_without_lm_head(vocab: TinyVocab, tmp_path: Path) -> None:
    path = write_hf_dir(MODELS["llama"](), tmp_path / "hf", vocab)
    st = load_file(str(path / "model.safetensors"))
    del st["lm_head.weight"]
    save_file(st, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_lm(path)
    cfg, sd, _ = load_safetensors_dir(path)
    assert not cfg.tie_embeddings and "lm_head.weight" not in sd
    with pytest.raises(ValueError, match="lm_head.weight"):
        build_lm(cfg, sd)


def test_unsupported_config_options_are_refused(vocab: TinyVocab, tmp_path: Path) -> None:
    path = write_hf_dir(MODELS["llama"](), tmp_path / "hf", vocab)
    base = json.loads((path / "config.json").read_text())
    assert config_from_hf(base).rope_theta == 10000.0
    llama_changes: list[tuple[dict[str, Any], str]] = [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "yarn"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
    ]
    for change, word in llama_changes:
        with pytest.raises(ValueError, match=word):
            config_from_hf({**base, **change})
    gpt2: dict[str, Any] = {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "vocab_size": 300,
    }
    assert config_from_hf(gpt2).d_ff == 256
    gpt2_changes: list[tuple[dict[str, Any], str]] = [
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ]
    for change, word in gpt2_changes:
        with pytest.raises(ValueError, match=word):
            config_from_hf({**gpt2, **change})
    tiny = write_gguf(MODELS["llama"](), tmp_path / "m.gguf", "F32", vocab=vocab)
    md = read_metadata(tiny.path)
    with pytest.raises(ValueError, match="yarn"):
        config_from_metadata({**md, "llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="llama.block_count"):
        config_from_metadata({k: v for k, v in md.items() if k != "llama.block_count"})


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_lm(tmp_path / "nope.gguf")


def test_tiny_model_class_is_ours(vocab: TinyVocab, tmp_path: Path) -> None:
    lm = load_lm(write_gguf(MODELS["gpt2"](), tmp_path / "g.gguf", "F32", vocab=vocab).path)
    assert isinstance(lm.model, CausalLM) and not lm.model.training
    assert lm.model.pos_embed is not None and lm.model.rotary is None


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path: Path) -> None:
    big = tiny_vocab(VOCAB_SIZE + 10)
    tiny = write_gguf(MODELS["gpt2"](), tmp_path / "g.gguf", "F32", vocab=big)
    with pytest.raises(ValueError, match="310 tokens but the model's vocabulary is 300"):
        load_lm(tiny.path)
