"""Load a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from model_core import models
from model_core.lm import LMConfig
from model_core.weights.names import state_dict_from_layout


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """The config of an HF checkpoint's model, by its family (model_core.models)."""
    return models.for_hf(hf.get("model_type")).from_hf(hf)


def load_safetensors_dir(path: str | os.PathLike[str]) -> tuple[LMConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (config, our state dict as float32, the HF config dict)."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d} has no config.json")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no *.safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update({k: v.float() for k, v in load_file(str(f)).items()})
    return cfg, state_dict_from_layout(raw, models.family(cfg.arch).hf_layout(cfg, raw.keys())), hf
