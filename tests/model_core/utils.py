"""Helpers shared by the model_core tests: references built from torch.nn (names, masks, padding)."""

from __future__ import annotations

import torch
from torch import nn

_RENAMES = [
    ("in_proj_weight", "qkv.weight"),
    ("in_proj_bias", "qkv.bias"),
    ("out_proj.", "out."),
    ("multihead_attn.", "cross_attn."),
    ("linear1.", "ff.w_in."),
    ("linear2.", "ff.w_out."),
]


def torch_to_ours(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename nn.Transformer{Encoder,Decoder}{Layer,} / nn.Transformer parameters to ours."""
    out = {}
    for key, value in state.items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[prefix + key] = value
    return out


def load_from_torch(ours: nn.Module, ref: nn.Module) -> None:
    """Copy every parameter; strict, so a missing or unmapped one fails the test."""
    ours.load_state_dict(torch_to_ours(ref.state_dict()), strict=True)


def torch_causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).triu(1)  # torch's convention: True = blocked


def pads(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)  # (B, T), True = pad
