"""Name maps from checkpoint formats to `CausalLM` parameter names: per architecture for Hugging Face
checkpoints, and one table for GGUF (`gguf_layout`), which also tells the quantized loader which GGUF
tensors make each linear layer (`gguf_linear_sources`).

Each map turns a checkpoint's tensors (already float tensors, keyed by the checkpoint's names) into
our state dict; fused projections are concatenated here: qkv = [q | k | v], ffn w_in = [gate | up].
Every tensor is checked against the shape the config implies (in PyTorch's (rows, cols) order),
and a checkpoint tensor no map uses is an error, so a file of another layout fails by name
instead of loading into wrong logits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from model_core.lm import LMConfig

Tensors = Mapping[str, torch.Tensor]

# HF checkpoints of some versions carry these non-weight buffers; they hold nothing we need.
_IGNORABLE_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class MissingTensorError(KeyError, ValueError):
    """A tensor the architecture needs is absent (a ValueError like every other bad-checkpoint error)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Source:
    """The checkpoint's tensors; remembers which ones were taken, checks each one's shape."""

    def __init__(self, tensors: Tensors) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def get(self, name: str, *shape: int) -> torch.Tensor:
        try:
            t = self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"checkpoint is missing tensor {name!r}") from None
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, the config implies {shape}")
        self.used.add(name)
        return t

    def optional(self, name: str, *shape: int) -> torch.Tensor | None:
        return self.get(name, *shape) if name in self.tensors else None

    def check_all_used(self, ignorable: tuple[str, ...] = ()) -> None:
        extra = sorted(n for n in self.tensors if n not in self.used and not n.endswith(ignorable))
        if extra:
            raise ValueError(
                f"checkpoint has {len(extra)} tensors this architecture does not use "
                f"(a variant we do not implement?), e.g. {extra[:5]}"
            )


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


def _head(sd: dict[str, torch.Tensor], src: _Source, name: str, cfg: LMConfig) -> None:
    w = src.optional(name, cfg.vocab_size, cfg.d_model)
    if w is not None:
        sd["lm_head.weight"] = w


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor stacked (by rows) into one of our parameters."""

    name: str  # the checkpoint's tensor name
    shape: tuple[int, ...]  # what the config implies, in PyTorch's (rows, cols) order
    rope_heads: int | None = None  # the rows carry llama.cpp's rotary permutation of this many heads


GGUF_HEAD, GGUF_EMBED = "output.weight", "token_embd.weight"


def gguf_layout(cfg: LMConfig) -> dict[str, tuple[Part, ...]]:
    """The GGUF name table: each of our parameters -> the GGUF tensors concatenated into it, in llama.cpp's
    names (the LM head, `output.weight`, is optional: without it the head is tied to the embedding)."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_rows, kv_rows = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd
    layout: dict[str, tuple[Part, ...]]
    if cfg.is_llama:
        layout = {"embed.weight": (Part(GGUF_EMBED, (V, C)),), "norm.weight": (Part("output_norm.weight", (C,)),)}
        for i in range(cfg.n_layers):
            p, o = f"blk.{i}.", f"blocks.{i}."
            layout[o + "attn.qkv.weight"] = (
                Part(p + "attn_q.weight", (q_rows, C), cfg.n_heads),
                Part(p + "attn_k.weight", (kv_rows, C), cfg.n_kv_heads),
                Part(p + "attn_v.weight", (kv_rows, C)),
            )
            layout[o + "attn.out.weight"] = (Part(p + "attn_output.weight", (C, q_rows)),)
            layout[o + "attn_norm.weight"] = (Part(p + "attn_norm.weight", (C,)),)
            layout[o + "ffn_norm.weight"] = (Part(p + "ffn_norm.weight", (C,)),)
            layout[o + "ffn.w_in.weight"] = (Part(p + "ffn_gate.weight", (F, C)), Part(p + "ffn_up.weight", (F, C)))
            layout[o + "ffn.w_out.weight"] = (Part(p + "ffn_down.weight", (C, F)),)
        return layout
    qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.hd
    layout = {
        "embed.weight": (Part(GGUF_EMBED, (V, C)),),
        "pos_embed.weight": (Part("position_embd.weight", (cfg.max_seq_len, C)),),
        "norm.weight": (Part("output_norm.weight", (C,)),),
        "norm.bias": (Part("output_norm.bias", (C,)),),
    }
    # ours, theirs, weight shape (rows, cols), bias length
    blocks = [
        ("attn_norm", "attn_norm", (C,), C),
        ("ffn_norm", "ffn_norm", (C,), C),
        ("attn.qkv", "attn_qkv", (qkv_rows, C), qkv_rows),
        ("attn.out", "attn_output", (C, q_rows), C),
        ("ffn.w_in", "ffn_up", (F, C), F),
        ("ffn.w_out", "ffn_down", (C, F), C),
    ]
    for i in range(cfg.n_layers):
        for ours, theirs, shape, n_bias in blocks:
            layout[f"blocks.{i}.{ours}.weight"] = (Part(f"blk.{i}.{theirs}.weight", shape),)
            layout[f"blocks.{i}.{ours}.bias"] = (Part(f"blk.{i}.{theirs}.bias", (n_bias,)),)
    return layout


def gguf_linear_sources(cfg: LMConfig, tensor_names: Collection[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Our linear layers (module paths) -> the GGUF tensors stacked into each, with the rotary head count
    where the rows are permuted; read from `gguf_layout`. The head reads the embedding when it is tied."""
    layers = {
        ours.removesuffix(".weight"): [(part.name, part.rope_heads) for part in parts]
        for ours, parts in gguf_layout(cfg).items()
        if ours.startswith("blocks.") and ours.endswith(".weight") and len(parts[0].shape) == 2
    }
    layers["lm_head"] = [(GGUF_HEAD if GGUF_HEAD in tensor_names else GGUF_EMBED, None)]
    return layers


def gguf_state_dict(tensors: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors (llama or GPT-2 layout) -> our state dict, by `gguf_layout`."""
    src = _Source(tensors)
    sd: dict[str, torch.Tensor] = {}
    for ours, parts in gguf_layout(cfg).items():
        rows = []
        for part in parts:
            w = src.get(part.name, *part.shape)
            rows.append(w if part.rope_heads is None else unpermute_rope_rows(w, part.rope_heads))
        sd[ours] = torch.cat(rows) if len(rows) > 1 else rows[0]
    _head(sd, src, GGUF_HEAD, cfg)
    src.check_all_used()
    return sd


def hf_llama(tensors: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    src = _Source(tensors)
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_rows, kv_rows = cfg.n_heads * cfg.hd, cfg.n_kv_heads * cfg.hd
    sd = {"embed.weight": src.get("model.embed_tokens.weight", V, C), "norm.weight": src.get("model.norm.weight", C)}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        sd[o + "attn.qkv.weight"] = torch.cat(
            [
                src.get(p + "self_attn.q_proj.weight", q_rows, C),
                src.get(p + "self_attn.k_proj.weight", kv_rows, C),
                src.get(p + "self_attn.v_proj.weight", kv_rows, C),
            ]
        )
        sd[o + "attn.out.weight"] = src.get(p + "self_attn.o_proj.weight", C, q_rows)
        sd[o + "attn_norm.weight"] = src.get(p + "input_layernorm.weight", C)
        sd[o + "ffn_norm.weight"] = src.get(p + "post_attention_layernorm.weight", C)
        sd[o + "ffn.w_in.weight"] = torch.cat(
            [src.get(p + "mlp.gate_proj.weight", F, C), src.get(p + "mlp.up_proj.weight", F, C)]
        )
        sd[o + "ffn.w_out.weight"] = src.get(p + "mlp.down_proj.weight", C, F)
    _head(sd, src, "lm_head.weight", cfg)
    src.check_all_used(_IGNORABLE_SUFFIXES)
    return sd


def hf_gpt2(tensors: Tensors, cfg: LMConfig) -> dict[str, torch.Tensor]:
    # HF GPT-2 uses Conv1D layers whose weights are stored (in, out): transpose to Linear's (out, in).
    src = _Source(tensors)
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_rows, qkv_rows = cfg.n_heads * cfg.hd, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.hd
    pre = "transformer." if "transformer.wte.weight" in tensors else ""
    sd = {
        "embed.weight": src.get(pre + "wte.weight", V, C),
        "pos_embed.weight": src.get(pre + "wpe.weight", cfg.max_seq_len, C),
        "norm.weight": src.get(pre + "ln_f.weight", C),
        "norm.bias": src.get(pre + "ln_f.bias", C),
    }
    # ours, theirs, HF weight shape (norm: (C,), Conv1D: (in, out)), bias length
    layout = [
        ("attn_norm", "ln_1", (C,), C),
        ("ffn_norm", "ln_2", (C,), C),
        ("attn.qkv", "attn.c_attn", (C, qkv_rows), qkv_rows),
        ("attn.out", "attn.c_proj", (q_rows, C), C),
        ("ffn.w_in", "mlp.c_fc", (C, F), F),
        ("ffn.w_out", "mlp.c_proj", (F, C), C),
    ]
    for i in range(cfg.n_layers):
        for ours, theirs, shape, n_bias in layout:
            w = src.get(f"{pre}h.{i}.{theirs}.weight", *shape)
            sd[f"blocks.{i}.{ours}.weight"] = w if "norm" in ours else w.t()
            sd[f"blocks.{i}.{ours}.bias"] = src.get(f"{pre}h.{i}.{theirs}.bias", n_bias)
    _head(sd, src, "lm_head.weight", cfg)
    src.check_all_used(_IGNORABLE_SUFFIXES)
    return sd


NAME_MAPS: dict[tuple[str, str], Callable[[Tensors, LMConfig], dict[str, torch.Tensor]]] = {
    ("gguf", "llama"): gguf_state_dict,
    ("gguf", "gpt2"): gguf_state_dict,
    ("hf", "llama"): hf_llama,
    ("hf", "gpt2"): hf_gpt2,
}
