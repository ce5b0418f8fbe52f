"""The registry of model families: one module per family in this package registers one `ArchSpec`.

A spec says how a family's config is read from GGUF metadata and from a Hugging Face `config.json` (into an
`LMConfig`: the sizes and the block options that `model_core.lm` builds), and which checkpoint tensors make each of
our parameters in both formats (a `Layout`, model_core.weights.names). The loaders look the family up here by the
GGUF `general.architecture` or the HF `model_type`; nothing outside this package branches on a family's name.

Adding a family: a new module here that calls `register(ArchSpec(...))` (every module of the package is imported
on first lookup), and its tests (tests/model_core/families.py builds a tiny model of each family both ways).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from model_core.lm import LMConfig
from model_core.weights.names import Layout


@dataclass(frozen=True)
class ArchSpec:
    name: str  # the family, as LMConfig.arch
    gguf_archs: tuple[str, ...]  # GGUF general.architecture values it reads
    hf_model_types: tuple[str, ...]  # config.json model_type values it reads
    from_gguf: Callable[[dict[str, Any]], LMConfig]  # metadata (with "_tensor_names") -> config
    from_hf: Callable[[dict[str, Any]], LMConfig]  # config.json -> config
    gguf_layout: Callable[[LMConfig], Layout]
    hf_layout: Callable[[LMConfig, Collection[str]], Layout]  # (config, the checkpoint's tensor names)
    options: dict[str, Any]  # the block options every model of the family has (LMConfig fields)

    def config(self, **fields: Any) -> LMConfig:
        """An LMConfig of this family: its options, then `fields` (sizes and per-model options)."""
        return LMConfig(arch=self.name, **{**self.options, **fields})


_SPECS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _SPECS:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def _specs() -> dict[str, ArchSpec]:
    if not _SPECS:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_") and mod.name != "common":
                importlib.import_module(f"{__name__}.{mod.name}")
    return _SPECS


def family(name: str) -> ArchSpec:
    """The spec registered as `name` (LMConfig.arch)."""
    try:
        return _specs()[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(sorted(_specs()))}") from None


def for_gguf(arch: Any) -> ArchSpec:
    """The spec that reads GGUF files of `general.architecture` == arch."""
    for spec in _specs().values():
        if arch in spec.gguf_archs:
            return spec
    known = sorted(a for s in _specs().values() for a in s.gguf_archs)
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(known)}")


def for_hf(model_type: Any) -> ArchSpec:
    """The spec that reads HF checkpoints of config.json `model_type` == model_type."""
    for spec in _specs().values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in _specs().values() for t in s.hf_model_types)
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(known)}")


def supported() -> list[ArchSpec]:
    return sorted(_specs().values(), key=lambda s: s.name)
