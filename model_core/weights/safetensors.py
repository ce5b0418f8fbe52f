"""Load a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from model_core.lm import LMConfig

_MODEL_TYPES = {"llama": "llama", "gpt2": "gpt2"}


def _require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    """Refuse a config.json option our model does not implement (it would load into wrong logits)."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json has {key}={value!r}; supported: {', '.join(map(repr, allowed))}")


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    mt = hf.get("model_type")
    if mt not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r} in config.json; supported: {', '.join(_MODEL_TYPES)}")
    if mt == "gpt2":
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        _require(hf, "scale_attn_weights", (True,), True)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        d = int(hf["n_embd"])
        return LMConfig(
            arch="gpt2",
            vocab_size=int(hf["vocab_size"]),
            d_model=d,
            n_layers=int(hf["n_layer"]),
            n_heads=int(hf["n_head"]),
            n_kv_heads=int(hf["n_head"]),
            d_ff=int(hf.get("n_inner") or 4 * d),
            max_seq_len=int(hf["n_positions"]),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "attention_bias", (False,), False)
    _require(hf, "mlp_bias", (False,), False)
    for key in ("rope_scaling", "rope_parameters"):  # transformers 5 writes rope_parameters
        rope = hf.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{key} {rope!r} (rope type {kind!r}) is not supported; only plain RoPE is")
    n_heads = int(hf["num_attention_heads"])
    hd = hf.get("head_dim")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return LMConfig(
        arch="llama",
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        head_dim=int(hd) if hd and int(hd) != int(hf["hidden_size"]) // n_heads else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def load_safetensors_dir(path: str | os.PathLike[str]) -> tuple[LMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (config, our state dict as float32, the HF config dict)."""
    from safetensors.torch import load_file

    from model_core.weights.names import NAME_MAPS

    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d} has no config.json")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no *.safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update({k: v.float() for k, v in load_file(str(f)).items()})
    return cfg, NAME_MAPS[("hf", cfg.arch)](raw, cfg), hf
