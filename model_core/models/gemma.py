"""Gemma (1), Gemma 2 and Gemma 3 (text): RMSNorm with a scale of (1 + w) (llama.cpp's files store 1 + w, HF
checkpoints w), embeddings scaled by sqrt(d_model), a GELU-tanh gated FFN, an attention scale of
query_pre_attn_scalar^-1/2, tied embeddings. Gemma 2 and 3 add norms after each sublayer too and interleave
sliding-window and global layers; Gemma 2 soft-caps attention scores and logits; Gemma 3 adds QK-norm and gives its
windowed layers their own RoPE base."""

from __future__ import annotations

import math
from collections.abc import Collection
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
    hf_layer_windows,
    hf_rope,
    hf_sizes,
    require,
)
from model_core.weights.names import Layout

OPTIONS: dict[str, Any] = {
    "norm": "rmsnorm",
    "activation": "geglu_tanh",
    "positions": "rope",
    "tie_embeddings": True,
}
HF = replace(
    HF_NAMES,
    ffn_norm="model.layers.{i}.pre_feedforward_layernorm",
    post_attn_norm="model.layers.{i}.post_attention_layernorm",
    post_ffn_norm="model.layers.{i}.post_feedforward_layernorm",
)
# llama.cpp's layer patterns (its GGUF files do not store them): Gemma 2 windows even layers, Gemma 3 all but
# every 6th
_GGUF_PATTERN = {"gemma": 0, "gemma2": 2, "gemma3": 6}


def _gguf_attn_scalar(sizes: dict[str, Any]) -> int:
    """llama.cpp's query_pre_attn_scalar for GGUF files, which do not store it: d_model / n_heads for the 27B
    models (46 or 62 layers), the head size otherwise."""
    if sizes["n_layers"] in (46, 62):
        return int(sizes["d_model"] // sizes["n_heads"])
    return int(sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"])


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    sizes = gguf_sizes(g)
    n = sizes["n_layers"]
    window = int(g.opt("attention.sliding_window") or 0)
    pattern = g.opt("attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):  # one bool per layer: True = sliding
        if len(pattern) != n:
            raise ValueError(
                f"GGUF {g.arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n} layers"
            )
        sliding = [bool(x) for x in pattern]
    else:  # every pattern-th layer is global
        every = int(pattern or _GGUF_PATTERN[g.arch])
        sliding = [bool(every and (i + 1) % every) for i in range(n)]
    windows = tuple(window if s else 0 for s in sliding) if window else ()
    extra: dict[str, Any] = {"post_norms": g.arch != "gemma"}
    if g.arch == "gemma2":
        extra["attn_softcap"] = float(g.opt("attn_logit_softcapping") or 0) or None
        extra["final_softcap"] = float(g.opt("final_logit_softcapping") or 0) or None
    elif g.arch == "gemma3":
        extra |= {"qk_norm": True, "rope_local_theta": float(g.opt("rope.freq_base_swa") or 10000.0)}
    return SPEC.config(
        **sizes,
        **gguf_rope(g),
        windows=windows,
        embed_scale=math.sqrt(sizes["d_model"]),
        attn_scale=_gguf_attn_scalar(sizes) ** -0.5,
        **extra,
    )


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "hidden_activation", ("gelu_pytorch_tanh", None), "gelu_pytorch_tanh")
    require(hf, "attention_bias", (False, None), False)
    sizes = {**hf_sizes(hf, tie_default=True), "norm_eps": float(hf.get("rms_norm_eps", 1e-6))}
    n, hd = sizes["n_layers"], sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"]
    windows = hf_layer_windows(hf, n)
    if not windows and hf.get("sliding_window"):  # configs before layer_types: llama.cpp's patterns
        pattern = int(hf.get("sliding_window_pattern") or _GGUF_PATTERN["gemma3" if _is_gemma3(hf) else "gemma2"])
        windows = tuple(int(hf["sliding_window"]) if (i + 1) % pattern else 0 for i in range(n))
    extra: dict[str, Any]
    if hf.get("model_type") == "gemma":
        require(hf, "hidden_act", ("gelu", "gelu_pytorch_tanh", None), None)  # (HF runs Gemma's GELU as tanh)
        extra = {**hf_rope(hf, hd)}
    elif _is_gemma3(hf):
        theta_local = hf.get("rope_local_base_freq")  # (configs before rope_parameters)
        if theta_local is None:
            local = hf_rope(hf, hd, "sliding_attention")
            if set(local) != {"rope_theta"}:
                raise ValueError(f"rope scaling of Gemma 3's sliding layers is not supported: {local}")
            theta_local = local["rope_theta"]
        extra = {"qk_norm": True, "rope_local_theta": float(theta_local), **hf_rope(hf, hd, "full_attention")}
    else:
        extra = {
            "attn_softcap": hf.get("attn_logit_softcapping"),
            "final_softcap": hf.get("final_logit_softcapping"),
            **hf_rope(hf, hd),
        }
    scalar = hf.get("query_pre_attn_scalar") or hd
    return SPEC.config(
        **sizes,
        post_norms=hf.get("model_type") != "gemma",
        windows=windows,
        embed_scale=math.sqrt(sizes["d_model"]),
        attn_scale=float(scalar) ** -0.5,
        **extra,
    )


def _is_gemma3(hf: dict[str, Any]) -> bool:
    return str(hf.get("model_type")).startswith("gemma3")


def _hf_layout(cfg: LMConfig, _names: Collection[str]) -> Layout:
    # Gemma 1 names its norms as a llama does; Gemma 2 and 3 call the post-attention norm what a llama's FFN norm is
    return decoder_layout(cfg, HF if cfg.post_norms else HF_NAMES, norm_offset=1.0)


SPEC = register(
    ArchSpec(
        name="gemma",
        gguf_archs=("gemma", "gemma2", "gemma3"),
        hf_model_types=("gemma", "gemma2", "gemma3_text"),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF_NAMES),
        hf_layout=_hf_layout,
        options=OPTIONS,
    )
)
