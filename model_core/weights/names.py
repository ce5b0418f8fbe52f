"""Name maps from checkpoint formats to `CausalLM` parameter names, one per (format, architecture).

Each map turns a checkpoint's tensors (already float tensors, keyed by the checkpoint's names) into
our state dict; fused projections are concatenated here: qkv = [q | k | v], ffn w_in = [gate | up].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from model_core.lm import LMConfig

Tensors = Mapping[str, torch.Tensor]


class MissingTensorError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _get(src: Tensors, name: str) -> torch.Tensor:
    try:
        return src[name]
    except KeyError:
        raise MissingTensorError(f"checkpoint is missing tensor {name!r}") from None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split rotary layout).

    w: (n_heads * hs, C) or (n_heads * hs,) for a bias.
    """
    hs = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hs // 2, 2, *rest).transpose(1, 2).reshape(w.shape)  # (nh, 2, hs/2, ...) flat


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (half-split -> interleaved); the inverse of `unpermute_rope_rows`."""
    hs = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hs // 2, *rest).transpose(1, 2).reshape(w.shape)  # (nh, hs/2, 2, ...) flat


def _copy_optional(dst: dict[str, torch.Tensor], src: Tensors, ours: str, theirs: str) -> None:
    if theirs in src:
        dst[ours] = src[theirs]


def gguf_llama(src: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    sd = {"embed.weight": _get(src, "token_embd.weight"), "norm.weight": _get(src, "output_norm.weight")}
    for i in range(cfg.n_layers):
        p, o = f"blk.{i}.", f"blocks.{i}."
        q = unpermute_rope_rows(_get(src, p + "attn_q.weight"), cfg.n_heads)
        k = unpermute_rope_rows(_get(src, p + "attn_k.weight"), cfg.n_kv_heads)
        sd[o + "attn.qkv.weight"] = torch.cat([q, k, _get(src, p + "attn_v.weight")])
        sd[o + "attn.out.weight"] = _get(src, p + "attn_output.weight")
        sd[o + "attn_norm.weight"] = _get(src, p + "attn_norm.weight")
        sd[o + "ffn_norm.weight"] = _get(src, p + "ffn_norm.weight")
        sd[o + "ffn.w_in.weight"] = torch.cat([_get(src, p + "ffn_gate.weight"), _get(src, p + "ffn_up.weight")])
        sd[o + "ffn.w_out.weight"] = _get(src, p + "ffn_down.weight")
    _copy_optional(sd, src, "lm_head.weight", "output.weight")
    return sd


def gguf_gpt2(src: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    sd = {
        "embed.weight": _get(src, "token_embd.weight"),
        "pos_embed.weight": _get(src, "position_embd.weight"),
        "norm.weight": _get(src, "output_norm.weight"),
        "norm.bias": _get(src, "output_norm.bias"),
    }
    pairs = {
        "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn.qkv": "attn_qkv",
        "attn.out": "attn_output", "ffn.w_in": "ffn_up", "ffn.w_out": "ffn_down",
    }
    for i in range(cfg.n_layers):
        for ours, theirs in pairs.items():
            for kind in ("weight", "bias"):
                sd[f"blocks.{i}.{ours}.{kind}"] = _get(src, f"blk.{i}.{theirs}.{kind}")
    _copy_optional(sd, src, "lm_head.weight", "output.weight")
    return sd


def hf_llama(src: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    sd = {"embed.weight": _get(src, "model.embed_tokens.weight"), "norm.weight": _get(src, "model.norm.weight")}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        sd[o + "attn.qkv.weight"] = torch.cat(
            [_get(src, p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
        )
        sd[o + "attn.out.weight"] = _get(src, p + "self_attn.o_proj.weight")
        sd[o + "attn_norm.weight"] = _get(src, p + "input_layernorm.weight")
        sd[o + "ffn_norm.weight"] = _get(src, p + "post_attention_layernorm.weight")
        gate, up = _get(src, p + "mlp.gate_proj.weight"), _get(src, p + "mlp.up_proj.weight")
        sd[o + "ffn.w_in.weight"] = torch.cat([gate, up])
        sd[o + "ffn.w_out.weight"] = _get(src, p + "mlp.down_proj.weight")
    _copy_optional(sd, src, "lm_head.weight", "lm_head.weight")
    return sd


def hf_gpt2(src: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    # HF GPT-2 uses Conv1D layers whose weights are stored (in, out): transpose to Linear's (out, in).
    pre = "transformer." if "transformer.wte.weight" in src else ""
    sd = {
        "embed.weight": _get(src, pre + "wte.weight"),
        "pos_embed.weight": _get(src, pre + "wpe.weight"),
        "norm.weight": _get(src, pre + "ln_f.weight"),
        "norm.bias": _get(src, pre + "ln_f.bias"),
    }
    pairs = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj",
             "ffn.w_in": "mlp.c_fc", "ffn.w_out": "mlp.c_proj"}
    for i in range(cfg.n_layers):
        for ours, theirs in pairs.items():
            w = _get(src, f"{pre}h.{i}.{theirs}.weight")
            sd[f"blocks.{i}.{ours}.weight"] = w if "norm" in ours else w.t()
            sd[f"blocks.{i}.{ours}.bias"] = _get(src, f"{pre}h.{i}.{theirs}.bias")
    _copy_optional(sd, src, "lm_head.weight", "lm_head.weight")
    return sd


NAME_MAPS: dict[tuple[str, str], Callable[[Tensors, LMConfig], dict[str, torch.Tensor]]] = {
    ("gguf", "llama"): gguf_llama,
    ("gguf", "gpt2"): gguf_gpt2,
    ("hf", "llama"): hf_llama,
    ("hf", "gpt2"): hf_gpt2,
}
