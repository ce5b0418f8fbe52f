"""Llama (2, 3.x with its rope scaling), Mistral, SmolLM and other llama-architecture models: RMSNorm, SwiGLU,
grouped-query attention, RoPE; no biases. llama.cpp stores Q and K rows permuted for its interleaved rotary form."""

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

OPTIONS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope"}


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    return SPEC.config(**gguf_sizes(g), **gguf_rope(g, tuple(meta.get("_rope_freqs", ()))))


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    require(hf, "attention_bias", (False, None), False)
    require(hf, "mlp_bias", (False, None), False)
    sizes = hf_sizes(hf)
    hd = sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"]
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    windows = (int(window),) * sizes["n_layers"] if window else ()
    return SPEC.config(**sizes, **hf_rope(hf, hd), windows=windows)


SPEC = register(
    ArchSpec(
        name="llama",
        gguf_archs=("llama",),
        hf_model_types=("llama", "mistral"),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF_NAMES, rope_permuted=True),
        hf_layout=lambda cfg, _names: decoder_layout(cfg, HF_NAMES),
        options=OPTIONS,
    )
)
