"""Qwen 2 and 2.5: a llama with biases on the Q, K and V projections; RoPE in the half-split (NEOX) form in GGUF
files too."""

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

OPTIONS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "qkv_bias": True}


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    return SPEC.config(**gguf_sizes(g), **gguf_rope(g))


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    require(hf, "use_sliding_window", (False, None), False)
    sizes = hf_sizes(hf)
    return SPEC.config(**sizes, **hf_rope(hf, sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"]))


SPEC = register(
    ArchSpec(
        name="qwen2",
        gguf_archs=("qwen2",),
        hf_model_types=("qwen2",),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF_NAMES),
        hf_layout=lambda cfg, _names: decoder_layout(cfg, HF_NAMES),
        options=OPTIONS,
    )
)
