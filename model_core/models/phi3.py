"""Phi-3 (and Phi-3.5 mini without LongRoPE): a llama whose Q, K, V projections are one fused tensor and whose
gate and up projections are one ([gate | up]); half-split RoPE; a sliding window on every layer where set."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from model_core.lm import LMConfig
from model_core.models import ArchSpec, register
from model_core.models.common import (
    GGUF_NAMES,
    HF_NAMES,
    GGUFKeys,
    decoder_layout,
    gguf_rope,
    gguf_sizes,
    hf_rope,
    hf_sizes,
    require,
)

OPTIONS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope"}
GGUF = replace(GGUF_NAMES, q=None, k=None, v=None, qkv="blk.{i}.attn_qkv", gate=None)
HF = replace(
    HF_NAMES,
    q=None,
    k=None,
    v=None,
    qkv="model.layers.{i}.self_attn.qkv_proj",
    gate=None,
    up="model.layers.{i}.mlp.gate_up_proj",
)


def _windows(window: Any, n_layers: int) -> tuple[int, ...]:
    return (int(window),) * n_layers if window else ()


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    if "rope_factors_long.weight" in g.tensor_names:
        raise ValueError("Phi-3 LongRoPE (rope_factors_long/short) is not supported; 4k-context Phi-3 files are")
    sizes = gguf_sizes(g)
    return SPEC.config(**sizes, **gguf_rope(g), windows=_windows(g.opt("attention.sliding_window"), sizes["n_layers"]))


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    sizes = hf_sizes(hf)
    rope = hf_rope(hf, sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"])
    return SPEC.config(**sizes, **rope, windows=_windows(hf.get("sliding_window"), sizes["n_layers"]))


SPEC = register(
    ArchSpec(
        name="phi3",
        gguf_archs=("phi3",),
        hf_model_types=("phi3",),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF),
        hf_layout=lambda cfg, _names: decoder_layout(cfg, HF),
        options=OPTIONS,
    )
)
