"""Qwen 3 (dense): a llama with an RMSNorm over each query and key head before RoPE (QK-norm); half-split RoPE."""

from __future__ import annotations

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

OPTIONS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "qk_norm": True}


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    return SPEC.config(**gguf_sizes(g), **gguf_rope(g))


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    require(hf, "attention_bias", (False, None), False)
    require(hf, "use_sliding_window", (False, None), False)
    sizes = hf_sizes(hf)
    return SPEC.config(**sizes, **hf_rope(hf, sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"]))


SPEC = register(
    ArchSpec(
        name="qwen3",
        gguf_archs=("qwen3",),
        hf_model_types=("qwen3",),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF_NAMES),
        hf_layout=lambda cfg, _names: decoder_layout(cfg, HF_NAMES),
        options=OPTIONS,
    )
)
