"""Checkpoint directories of the small models (GAN generator, G2P): `config.json` + `model.safetensors`.

The config is the model's config as JSON (provenance, if any, under "training"); the tensors are its state
dict. Reading validates both: the files exist, the JSON is an object the model's config accepts, and the
tensors have exactly the names and shapes the config implies and finite values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

C = TypeVar("C")


def write_checkpoint(
    path_dir: str | Path,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    model: str,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `config` (+ `extra` under "training") and `tensors` (on the CPU, in `dtype` if given); `model`
    names the kind in the safetensors metadata. Returns the directory."""
    from safetensors.torch import save_file

    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if extra:
        cfg["training"] = extra
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model": model})
    return out


def config_fields(cls: type, d: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The entries of a config dict that are fields of the dataclass `cls`; ValueError naming any other key
    ("training" holds provenance, not shape, and is left out)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - {"training"})
    if unknown:
        raise ValueError(f"unknown {kind} config keys: {unknown}; expected a subset of {sorted(known)}")
    return {k: v for k, v in d.items() if k in known}


def read_config(path_dir: Path, kind: str, from_dict: Callable[[dict[str, Any]], C]) -> C:
    """The config of the checkpoint in `path_dir` (both files must exist); `kind` ("GAN", "G2P") names the
    model in errors, `from_dict` builds and validates its config."""
    cfg_path, w_path = path_dir / CONFIG_FILE, path_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{kind} checkpoint incomplete: {p} is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    try:
        return from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: invalid {kind} config: {e}") from e


def read_tensors(path_dir: Path, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against `expected` (the state dict the config implies: names and
    shapes, and finite values), cast to the expected dtypes."""
    from safetensors.torch import load_file

    w_path = path_dir / WEIGHTS_FILE
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{w_path}: not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{w_path}: tensor names do not match the config: missing={missing}, unexpected={unexpected}")
    bad = [
        f"{k}: file {tuple(state[k].shape)} != expected {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{w_path}: tensor shapes do not match the config: " + "; ".join(bad))
    nonfinite = [k for k, v in state.items() if not bool(torch.isfinite(v.float()).all())]
    if nonfinite:
        raise ValueError(f"{w_path}: tensors with NaN or infinite values: {nonfinite}")
    return {k: v.to(expected[k].dtype) for k, v in state.items()}
