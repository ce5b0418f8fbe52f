"""Which LMs this server serves, by name, before any is loaded: `--model` (repeatable: a path, or NAME=PATH) and
every model in `--models-dir`, each a `ModelSpec` (its id, its path and the size of its weight files).

A bare path's id is `--served-model-name` when it is the only model, else its file name without `.gguf` (a folder's
name for a Hugging Face directory), as the loaders name it; no `--model` and no `--models-dir`: the default model.
Two models with one id, a `--preload` naming no model or `--served-model-name` with several models are start-up
errors (ValueError) that say what to change."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model_core.default_model import DEFAULT_GGUF_NAME, find_default_model


@dataclass(frozen=True)
class ModelSpec:
    """An LM the server serves: its id, where it is, and how load errors name it."""

    name: str
    path: str | None  # None: the default model (its wheel is not installed: its load says so)
    label: str  # "model PATH" or "the default model", in load errors
    weight_bytes: int  # its weight files on disk (0 when missing): the load's memory estimate starts here


def weight_bytes(path: str | None) -> int:
    """The bytes of a model's weight files: a GGUF file's size, or a folder's *.safetensors; 0 if none is there."""
    if path is None:
        return 0
    p = Path(path)
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.glob("*.safetensors"))
        return p.stat().st_size
    except OSError:
        return 0


def _name_of(path: str) -> str:
    """A model's id from its path, as the loaders name it: the file without `.gguf`, or the folder."""
    base = os.path.basename(os.path.normpath(path))
    return base.removesuffix(".gguf")


def _split(arg: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a path (one that exists, even with a '=' in it) -> (None, path)."""
    name, eq, path = arg.partition("=")
    if not eq or not name or not path or os.path.exists(arg):
        return None, arg
    return name, path


def _in_dir(directory: str) -> list[str]:
    """The models in a folder, by name: every *.gguf file and every folder with config.json and *.safetensors."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"models_dir {directory!r} is not a directory")
    found = []
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.endswith(".gguf"):
            found.append(str(p))
        elif p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            found.append(str(p))
    return found


def model_specs(models: Sequence[str], models_dir: str | None, served_model_name: str | None) -> list[ModelSpec]:
    """The LMs to serve, in order: each `--model`, then the models of `models_dir` (ValueError: see the module)."""
    given = [_split(m) for m in models] + [(None, p) for p in (_in_dir(models_dir) if models_dir else [])]
    if models_dir and not given:
        raise ValueError(
            f"models_dir {models_dir!r} holds no model (GGUF files, or folders with config.json and *.safetensors)"
        )
    if not given:
        default: str | None
        try:
            default = find_default_model()
        except FileNotFoundError:
            default = None
        default_name = served_model_name or DEFAULT_GGUF_NAME.removesuffix(".gguf")
        return [ModelSpec(default_name, default, "the default model", weight_bytes(default))]
    if served_model_name and len(given) > 1:
        raise ValueError(
            "served_model_name names the only model served; with several, give each its id as --model NAME=PATH"
        )
    specs: list[ModelSpec] = []
    for name, path in given:
        label = f"model {path}" if name is None else f"model {name} ({path})"
        specs.append(ModelSpec(name or served_model_name or _name_of(path), path, label, weight_bytes(path)))
    seen: dict[str, ModelSpec] = {}
    for s in specs:
        if s.name in seen:
            raise ValueError(
                f"two models have the id {s.name!r} ({seen[s.name].path} and {s.path}): name one with --model NAME=PATH"
            )
        seen[s.name] = s
    return specs


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter served under its own id over one of the LMs (`--lora-modules NAME=PATH[@MODEL]`)."""

    name: str
    path: str
    base: str  # the id of the LM it adapts


def lora_specs(entries: Sequence[str], lm_names: Sequence[str]) -> list[LoraSpec]:
    """`--lora-modules` entries, each NAME=PATH (over the first LM) or NAME=PATH@MODEL. ValueError for an entry of
    another shape, a MODEL not served, or an id that another adapter or an LM has."""
    specs: list[LoraSpec] = []
    taken = set(lm_names)
    for entry in entries:
        name, eq, rest = entry.partition("=")
        path, at, base = rest.rpartition("@") if "@" in rest and not os.path.exists(rest) else (rest, "", "")
        if not eq or not name or not path or (at and not base):
            raise ValueError(f"lora_modules entry {entry!r}: expected NAME=PATH or NAME=PATH@MODEL")
        base = base or lm_names[0]
        if base not in lm_names:
            available = ", ".join(f"'{n}'" for n in lm_names)
            raise ValueError(f"lora_modules entry {entry!r}: no model {base!r} is served; available: {available}")
        if name in taken:
            raise ValueError(f"lora_modules entry {entry!r}: the id {name!r} is taken by a model or another adapter")
        taken.add(name)
        specs.append(LoraSpec(name, path, base))
    return specs


def preload_names(preload: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """The models loaded at start-up: `None` = the first; `all`; `none`; or names that must be served."""
    if preload is None:
        return list(names[:1])
    if list(preload) == ["all"]:
        return list(names)
    if list(preload) == ["none"]:
        return []
    unknown = [p for p in preload if p not in names]
    if unknown:
        available = ", ".join(f"'{n}'" for n in names)
        raise ValueError(f"preload names models not served: {', '.join(unknown)}; available: {available}")
    return list(dict.fromkeys(preload))
