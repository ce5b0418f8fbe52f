"""From a checkpoint's tensor names to `CausalLM` parameter names, by a layout (each family's, for GGUF and for
Hugging Face checkpoints: model_core.models), which also tells the quantized loader which GGUF tensors make each
linear layer (`linear_sources`).

A layout turns a checkpoint's tensors (already float tensors, keyed by the checkpoint's names) into our state dict;
fused projections are concatenated here: qkv = [q | k | v], ffn w_in = [gate | up]. Every tensor is checked
against the shape the config implies, and a checkpoint tensor no layout uses is an error, so a file of another
layout fails by name instead of loading into wrong logits.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor stacked (by rows) into one of our parameters."""

    name: str  # the checkpoint's tensor name
    shape: tuple[int, ...]  # as stored, in PyTorch's (rows, cols) order (transposed: (cols, rows))
    rope_heads: int | None = None  # the rows carry llama.cpp's rotary permutation of this many heads
    transposed: bool = False  # stored (in, out) (GPT-2's Conv1D): transposed to (out, in) on load
    offset: float = 0.0  # added on load (Gemma's RMSNorm weights are stored as w for 1 + w in HF checkpoints)
    optional: bool = False  # may be absent (then so is our parameter: the LM head of a tied model)


Layout = dict[str, tuple[Part, ...]]  # our parameter name -> the checkpoint tensors concatenated into it

GGUF_HEAD, GGUF_EMBED = "output.weight", "token_embd.weight"


def state_dict_from_layout(tensors: Tensors, layout: Layout) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors -> our state dict, by a family's layout (model_core.models); every checkpoint tensor
    must be used (apart from buffers HF checkpoints carry)."""
    src = _Source(tensors)
    sd: dict[str, torch.Tensor] = {}
    for ours, parts in layout.items():
        if all(part.optional and part.name not in tensors for part in parts):
            continue
        rows = []
        for part in parts:
            w = src.get(part.name, *part.shape)
            if part.transposed:
                w = w.t()
            if part.rope_heads is not None:
                w = unpermute_rope_rows(w, part.rope_heads)
            rows.append(w + part.offset if part.offset else w)
        sd[ours] = torch.cat(rows) if len(rows) > 1 else rows[0]
    src.check_all_used(_IGNORABLE_SUFFIXES)
    return sd


def linear_sources(layout: Layout, tensor_names: Collection[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Our linear layers (module paths) -> the GGUF tensors stacked into each, with the rotary head count where the
    rows are permuted; read from a GGUF layout. The head reads the embedding when it is tied."""
    layers = {
        ours.removesuffix(".weight"): [(part.name, part.rope_heads) for part in parts]
        for ours, parts in layout.items()
        if ours.startswith("blocks.") and ours.endswith(".weight") and len(parts[0].shape) == 2
    }
    layers["lm_head"] = [(GGUF_HEAD if GGUF_HEAD in tensor_names else GGUF_EMBED, None)]
    return layers
