"""GPT-2: learned positions, LayerNorm, a GELU-tanh FFN, biases everywhere; HF checkpoints store the projections
as Conv1D weights, (in, out)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from model_core.lm import LMConfig
from model_core.models import ArchSpec, register
from model_core.models.common import GGUFKeys, gguf_sizes, require
from model_core.weights.names import GGUF_EMBED, GGUF_HEAD, Layout, Part

OPTIONS: dict[str, Any] = {
    "norm": "layernorm",
    "activation": "gelu_tanh",
    "positions": "learned",
    "qkv_bias": True,
    "out_bias": True,
    "ffn_bias": True,
}


def from_gguf(meta: dict[str, Any]) -> LMConfig:
    g = GGUFKeys(meta)
    return SPEC.config(**gguf_sizes(g, eps_key="attention.layer_norm_epsilon"))


def from_hf(hf: dict[str, Any]) -> LMConfig:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    require(hf, "scale_attn_weights", (True,), True)
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    d = int(hf["n_embd"])
    return SPEC.config(
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


def _layout(cfg: LMConfig, names: dict[str, str], block: str, conv1d: bool) -> Layout:
    """names: our top-level parameters -> theirs; block: a layer's prefix ({i}); conv1d: (in, out) weights."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_rows, qkv_rows = cfg.n_heads * cfg.hd, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.hd
    layout: Layout = {
        "embed.weight": (Part(names["embed"], (V, C)),),
        "pos_embed.weight": (Part(names["pos"], (cfg.max_seq_len, C)),),
        "norm.weight": (Part(names["norm"] + ".weight", (C,)),),
        "norm.bias": (Part(names["norm"] + ".bias", (C,)),),
        "lm_head.weight": (Part(names["head"], (V, C), optional=True),),
    }
    # ours, theirs, weight shape (rows, cols) as ours, bias length
    parts = [
        ("attn_norm", names["attn_norm"], (C,), C),
        ("ffn_norm", names["ffn_norm"], (C,), C),
        ("attn.qkv", names["qkv"], (qkv_rows, C), qkv_rows),
        ("attn.out", names["out"], (C, q_rows), C),
        ("ffn.w_in", names["up"], (F, C), F),
        ("ffn.w_out", names["down"], (C, F), C),
    ]
    for i in range(cfg.n_layers):
        p = block.format(i=i)
        for ours, theirs, shape, n_bias in parts:
            matrix = len(shape) == 2 and conv1d
            stored = shape[::-1] if matrix else shape
            layout[f"blocks.{i}.{ours}.weight"] = (Part(f"{p}{theirs}.weight", stored, transposed=matrix),)
            layout[f"blocks.{i}.{ours}.bias"] = (Part(f"{p}{theirs}.bias", (n_bias,)),)
    return layout


def gguf_layout(cfg: LMConfig) -> Layout:
    names = {
        "embed": GGUF_EMBED,
        "pos": "position_embd.weight",
        "norm": "output_norm",
        "head": GGUF_HEAD,
        "attn_norm": "attn_norm",
        "ffn_norm": "ffn_norm",
        "qkv": "attn_qkv",
        "out": "attn_output",
        "up": "ffn_up",
        "down": "ffn_down",
    }
    return _layout(cfg, names, "blk.{i}.", conv1d=False)


def hf_layout(cfg: LMConfig, tensor_names: Collection[str]) -> Layout:
    prefix = "transformer." if "transformer.wte.weight" in tensor_names else ""  # (checkpoints of some versions)
    names = {
        "embed": prefix + "wte.weight",
        "pos": prefix + "wpe.weight",
        "norm": prefix + "ln_f",
        "head": "lm_head.weight",
        "attn_norm": "ln_1",
        "ffn_norm": "ln_2",
        "qkv": "attn.c_attn",
        "out": "attn.c_proj",
        "up": "mlp.c_fc",
        "down": "mlp.c_proj",
    }
    return _layout(cfg, names, prefix + "h.{i}.", conv1d=True)


SPEC = register(
    ArchSpec(
        name="gpt2",
        gguf_archs=("gpt2",),
        hf_model_types=("gpt2",),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=gguf_layout,
        hf_layout=hf_layout,
        options=OPTIONS,
    )
)
