"""What the families share: reading a llama-like config from GGUF metadata or a config.json, RoPE variants, and
the tensor layout of a llama-like decoder in either format's names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from model_core.lm import LMConfig
from model_core.models import ArchSpec
from model_core.weights.names import GGUF_EMBED, GGUF_HEAD, Layout, Part


class GGUFKeys:
    """A GGUF file's metadata under its architecture's prefix: `get("block_count")` reads "<arch>.block_count"."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.arch = str(meta.get("general.architecture"))

    def get(self, name: str, default: Any = None) -> Any:
        v = self.meta.get(f"{self.arch}.{name}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks '{self.arch}.{name}'")
        return v

    def opt(self, name: str) -> Any:
        return self.meta.get(f"{self.arch}.{name}")

    @property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(self.meta.get("_tensor_names", ()))


def gguf_sizes(g: GGUFKeys, eps_key: str = "attention.layer_norm_rms_epsilon") -> dict[str, Any]:
    """The LMConfig sizes every GGUF family stores under the same keys."""
    n_heads = int(g.get("attention.head_count"))
    vocab = g.opt("vocab_size") or len(g.meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError("GGUF metadata has neither a vocab size nor tokenizer tokens")
    d_model = int(g.get("embedding_length"))
    head_dim = g.opt("attention.key_length") or g.opt("rope.dimension_count")
    return dict(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(g.get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g.opt("attention.head_count_kv") or n_heads),
        d_ff=int(g.get("feed_forward_length")),
        max_seq_len=int(g.get("context_length")),
        norm_eps=float(g.get(eps_key, 1e-5)),
        head_dim=int(head_dim) if head_dim and int(head_dim) != d_model // n_heads else None,
        tie_embeddings=GGUF_HEAD not in g.tensor_names,
    )


def gguf_rope(g: GGUFKeys, freq_factors: tuple[float, ...] = ()) -> dict[str, Any]:
    """RoPE base and scaling from GGUF metadata: none or linear (Llama 3's scaling comes as the `rope_freqs` tensor,
    whose values the loader passes as freq_factors)."""
    if g.opt("rope.dimension_count") is not None:
        hd = int(g.opt("attention.key_length") or int(g.get("embedding_length")) // int(g.get("attention.head_count")))
        if int(g.opt("rope.dimension_count")) != hd:
            raise ValueError(f"GGUF partial rotary ({g.arch}.rope.dimension_count < head size) is not supported")
    scaling = g.opt("rope.scaling.type")
    out: dict[str, Any] = {"rope_theta": float(g.get("rope.freq_base", 10000.0)), "rope_freq_factors": freq_factors}
    if scaling == "linear":
        out["rope_linear"] = float(g.get("rope.scaling.factor"))
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported; supported: none, linear, llama3")
    return out


def require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    """Refuse a config.json option the family's implementation does not have (it would load into wrong logits)."""
    value = hf.get(key, default)
    if value not in allowed:
        raise ValueError(f"config.json has {key}={value!r}; supported: {', '.join(map(repr, allowed))}")


def hf_rope(hf: dict[str, Any], hd: int, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE base and scaling from a config.json, as LMConfig fields (rope_theta, rope_freq_factors, rope_linear):
    the legacy `rope_theta` + `rope_scaling` keys or transformers 5's `rope_parameters` (per layer type where it is
    keyed so). Supported kinds: default, linear, llama3."""
    params = dict(hf.get("rope_parameters") or {})
    if layer_type is not None and layer_type in params:
        params = dict(params[layer_type])
    scaling = dict(hf.get("rope_scaling") or {})

    def kind_of(d: dict[str, Any]) -> str:
        return str(d.get("rope_type", d.get("type", "default")))

    if kind_of(scaling) != "default":  # (the legacy key, where a config has both)
        params = {**params, **scaling}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = kind_of(scaling) if kind_of(scaling) != "default" else kind_of(params)
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError("config.json has partial_rotary_factor != 1, which is not supported")
    if kind == "linear":
        out["rope_linear"] = float(params["factor"])
    elif kind == "llama3":
        out["rope_freq_factors"] = llama3_freq_factors(
            hd,
            float(theta),
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} in config.json is not supported; supported: default, linear, llama3")
    return out


def llama3_freq_factors(
    hd: int, theta: float, factor: float, low: float, high: float, original: int
) -> tuple[float, ...]:
    """Llama 3's rope scaling as a divisor per frequency (the values llama.cpp's converter stores as `rope_freqs`):
    long wavelengths are slowed by `factor`, short ones kept, those between interpolated smoothly."""
    out = []
    for i in range(0, hd, 2):
        freq = 1.0 / theta ** (i / hd)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def hf_sizes(hf: dict[str, Any], tie_default: bool = False) -> dict[str, Any]:
    """The LMConfig sizes of a llama-like config.json."""
    n_heads = int(hf["num_attention_heads"])
    hd = hf.get("head_dim")
    d_model = int(hf["hidden_size"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        head_dim=int(hd) if hd and int(hd) != d_model // n_heads else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
    )


def hf_layer_windows(hf: dict[str, Any], n_layers: int) -> tuple[int, ...]:
    """Per-layer attention windows from a config.json's `layer_types` ("sliding_attention" layers get
    `sliding_window`), or () where every layer is global."""
    types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if not types or not window:
        return ()
    if len(types) != n_layers:
        raise ValueError(f"config.json has {len(types)} layer_types for {n_layers} layers")
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"config.json layer_types {bad} are not supported (sliding_attention, full_attention)")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


@dataclass(frozen=True)
class TensorNames:
    """One format's names for a llama-like decoder's tensors (without ".weight"/".bias"; `{i}`: the layer). None:
    the family has no such tensor in this format (fused qkv instead of q, k, v; fused gate|up as `up`)."""

    embed: str
    final_norm: str
    head: str
    attn_norm: str
    out: str
    ffn_norm: str
    up: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    gate: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    post_attn_norm: str | None = None
    post_ffn_norm: str | None = None


GGUF_NAMES = TensorNames(
    embed=GGUF_EMBED.removesuffix(".weight"),
    final_norm="output_norm",
    head=GGUF_HEAD.removesuffix(".weight"),
    attn_norm="blk.{i}.attn_norm",
    q="blk.{i}.attn_q",
    k="blk.{i}.attn_k",
    v="blk.{i}.attn_v",
    out="blk.{i}.attn_output",
    ffn_norm="blk.{i}.ffn_norm",
    gate="blk.{i}.ffn_gate",
    up="blk.{i}.ffn_up",
    down="blk.{i}.ffn_down",
    q_norm="blk.{i}.attn_q_norm",
    k_norm="blk.{i}.attn_k_norm",
    post_attn_norm="blk.{i}.post_attention_norm",
    post_ffn_norm="blk.{i}.post_ffw_norm",
)

HF_NAMES = TensorNames(
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    attn_norm="model.layers.{i}.input_layernorm",
    q="model.layers.{i}.self_attn.q_proj",
    k="model.layers.{i}.self_attn.k_proj",
    v="model.layers.{i}.self_attn.v_proj",
    out="model.layers.{i}.self_attn.o_proj",
    ffn_norm="model.layers.{i}.post_attention_layernorm",
    gate="model.layers.{i}.mlp.gate_proj",
    up="model.layers.{i}.mlp.up_proj",
    down="model.layers.{i}.mlp.down_proj",
    q_norm="model.layers.{i}.self_attn.q_norm",
    k_norm="model.layers.{i}.self_attn.k_norm",
)


def decoder_layout(cfg: LMConfig, names: TensorNames, rope_permuted: bool = False, norm_offset: float = 0.0) -> Layout:
    """The layout of a llama-like decoder (RoPE; RMSNorm; gated FFN) with the block options of `cfg`, in `names`.
    rope_permuted: Q and K rows are in llama.cpp's interleaved rotary order (its llama GGUF files); norm_offset:
    added to every norm weight (Gemma's HF checkpoints store w for a scale of 1 + w)."""
    C, F, V, hd = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.hd
    nh, nkv = cfg.n_heads, cfg.n_kv_heads

    def norm(name: str, dim: int = C) -> tuple[Part, ...]:
        return (Part(name + ".weight", (dim,), offset=norm_offset),)

    layout: Layout = {
        "embed.weight": (Part(names.embed + ".weight", (V, C)),),
        "norm.weight": norm(names.final_norm),
        "lm_head.weight": (Part(names.head + ".weight", (V, C), optional=True),),
    }
    for i in range(cfg.n_layers):
        o = f"blocks.{i}."

        def n(field: str, i: int = i) -> str:
            """This layer's name of a tensor the family has."""
            pattern = getattr(names, field)
            assert pattern is not None, f"{field} has no name in this family's layout"
            return str(pattern).format(i=i)

        qkv_w: tuple[Part, ...]
        qkv_b: tuple[Part, ...]
        if names.qkv is not None:
            qkv_w = (Part(n("qkv") + ".weight", ((nh + 2 * nkv) * hd, C)),)
            qkv_b = (Part(n("qkv") + ".bias", ((nh + 2 * nkv) * hd,)),)
        else:
            rq, rk = (nh, nkv) if rope_permuted else (None, None)
            qkv_w = (
                Part(n("q") + ".weight", (nh * hd, C), rq),
                Part(n("k") + ".weight", (nkv * hd, C), rk),
                Part(n("v") + ".weight", (nkv * hd, C)),
            )
            qkv_b = (
                Part(n("q") + ".bias", (nh * hd,), rq),
                Part(n("k") + ".bias", (nkv * hd,), rk),
                Part(n("v") + ".bias", (nkv * hd,)),
            )
        layout[o + "attn.qkv.weight"] = qkv_w
        if cfg.qkv_bias:
            layout[o + "attn.qkv.bias"] = qkv_b
        layout[o + "attn.out.weight"] = (Part(n("out") + ".weight", (C, nh * hd)),)
        if cfg.out_bias:
            layout[o + "attn.out.bias"] = (Part(n("out") + ".bias", (C,)),)
        layout[o + "attn_norm.weight"] = norm(n("attn_norm"))
        layout[o + "ffn_norm.weight"] = norm(n("ffn_norm"))
        if cfg.qk_norm:
            layout[o + "attn.q_norm.weight"] = norm(n("q_norm"), hd)
            layout[o + "attn.k_norm.weight"] = norm(n("k_norm"), hd)
        if cfg.post_norms:
            layout[o + "post_attn_norm.weight"] = norm(n("post_attn_norm"))
            layout[o + "post_ffn_norm.weight"] = norm(n("post_ffn_norm"))
        if names.gate is not None:
            layout[o + "ffn.w_in.weight"] = (Part(n("gate") + ".weight", (F, C)), Part(n("up") + ".weight", (F, C)))
        else:  # gate and up fused in one tensor, [gate | up]
            layout[o + "ffn.w_in.weight"] = (Part(n("up") + ".weight", (2 * F, C)),)
        layout[o + "ffn.w_out.weight"] = (Part(n("down") + ".weight", (C, F)),)
    return layout


LLAMA_OPTIONS: dict[str, Any] = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope"}


def llama_variant(name: str, hf_refuse: dict[str, tuple[Any, ...]], **options: Any) -> ArchSpec:
    """The spec of a family that is a llama with `options` (LMConfig block options) and half-split RoPE in its GGUF
    files too (GGUF architecture and HF model_type both `name`); hf_refuse: config.json keys -> the values
    supported (the first is the default)."""

    def from_gguf(meta: dict[str, Any]) -> LMConfig:
        g = GGUFKeys(meta)
        return spec.config(**gguf_sizes(g), **gguf_rope(g))

    def from_hf(hf: dict[str, Any]) -> LMConfig:
        for key, allowed in {"hidden_act": ("silu",), **hf_refuse}.items():
            require(hf, key, allowed, allowed[0])
        sizes = hf_sizes(hf)
        return spec.config(**sizes, **hf_rope(hf, sizes["head_dim"] or sizes["d_model"] // sizes["n_heads"]))

    spec = ArchSpec(
        name=name,
        gguf_archs=(name,),
        hf_model_types=(name,),
        from_gguf=from_gguf,
        from_hf=from_hf,
        gguf_layout=lambda cfg: decoder_layout(cfg, GGUF_NAMES),
        hf_layout=lambda cfg, _names: decoder_layout(cfg, HF_NAMES),
        options={**LLAMA_OPTIONS, **options},
    )
    return spec
