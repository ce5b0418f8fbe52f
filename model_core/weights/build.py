"""Turn a config and a state dict (our names) into a `CausalLM`, validating names and shapes."""

from __future__ import annotations

import torch
from torch import nn

from model_core.lm import CausalLM, LMConfig


def build_lm(
    cfg: LMConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> CausalLM:
    if not cfg.tie_embeddings and "lm_head.weight" not in sd:
        raise ValueError("checkpoint is missing tensor 'lm_head.weight' and the config does not tie embeddings")
    sd = dict(sd)  # the caller's dict is left as it was (the tied head is dropped from our copy)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(sd[name].shape)}, the config implies {tuple(shape)}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensors the model does not use, e.g. {unexpected[:5]}")
    model.to(dtype).to_empty(device=device)  # (the dtype first, on meta: the storage is allocated once, in it)
    with torch.no_grad():  # tensor by tensor (no second copy of the whole checkpoint in the model's dtype)
        params = model.state_dict(keep_vars=True)
        for name, value in sd.items():
            if value.is_meta:  # not loaded (a linear layer that runs on its quantized weights only): shape only
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, nn.Parameter(value.to(dtype), requires_grad=False))
            else:
                params[name].copy_(value)
    if cfg.tie_embeddings:
        table = model.embed.weight
        assert isinstance(table, nn.Parameter)
        model.lm_head.weight = table
    # buffers (rotary tables) were on meta: rebuild them on the device
    if model.rotary is not None:
        rotary, local = CausalLM.rotary_tables(cfg)
        model.rotary, model.rotary_local = rotary.to(device), None if local is None else local.to(device)
    return model.to(dtype).eval()
