"""Read a LoRA adapter for a model: a PEFT folder (adapter_config.json + adapter_model.safetensors) or llama.cpp's
GGUF LoRA (general.type "adapter", adapter.type "lora", as its convert_lora_to_gguf.py writes it), into a
`model_core.lora.LoRAAdapter` bound to the model's projections.

Each adapter tensor pair names the base model's checkpoint tensor it updates (PEFT:
`base_model.model.<HF name>.lora_A.weight` / `.lora_B.weight`; GGUF: `<GGUF name>.weight.lora_a` / `.lora_b`). The
base model's family layout (model_core.models: the same tables its own weights load by) says which of our
projections that tensor is stacked into, at which rows, and whether its rows carry llama.cpp's rotary permutation
(the llama family's GGUF Q and K: the converter permutes the adapter's B as it permutes the base weights, so B's
rows are un-permuted here as the base rows are on load). Every tensor is checked against the model: a target the
model does not have, one that is not a block projection (embeddings, the LM head), a shape that does not fit or a
half of a pair missing is a ValueError naming the tensor.

Scale: PEFT's lora_alpha / r (rsLoRA: lora_alpha / sqrt(r); alpha_pattern and rank_pattern per module), llama.cpp's
adapter.lora.alpha / r (its converter writes PEFT's lora_alpha as it is; llama.cpp applies alpha / r).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_core import models
from model_core.lm import LMConfig
from model_core.lora import TARGETS, LoRAAdapter, LoRAWeight
from model_core.weights.names import Layout, unpermute_rope_rows

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_PAIR = re.compile(r"^(?P<base>.+)\.lora_(?P<half>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_GGUF_PAIR = re.compile(r"^(?P<base>.+\.weight)\.lora_(?P<half>[ab])$")


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor sits in our projections: module path, first row, rows, input size."""

    module: str
    row: int
    rows: int
    cols: int
    rope_heads: int | None


def load_lora(path: str | os.PathLike[str], cfg: LMConfig, name: str | None = None) -> LoRAAdapter:
    """The adapter at `path` (a PEFT folder, or a GGUF LoRA file) for a model of config `cfg`, validated against it;
    named `name` (default: the folder's or file's name). Weights in float64 on the CPU (`LoRAAdapter.to` moves
    them)."""
    p = Path(path)
    if p.is_dir():
        pairs, scales, alpha = _read_peft(p)
        fmt, layout = "peft", _hf_layout(cfg, pairs)
    elif p.is_file():
        pairs, scales, alpha = _read_gguf(p, cfg)
        fmt, layout = "gguf", models.family(cfg.arch).gguf_layout(cfg)
    else:
        raise FileNotFoundError(f"LoRA adapter path {str(p)!r} does not exist")
    if not pairs:
        raise ValueError(f"LoRA adapter {str(p)!r} has no lora_A/lora_B tensor pairs")
    slots = _slots(layout)
    by_module: dict[str, list[tuple[_Slot, torch.Tensor, torch.Tensor]]] = {}
    for base, (a, b) in sorted(pairs.items()):
        slot = slots.get(base)
        if slot is None:
            raise ValueError(f"LoRA adapter {str(p)!r} targets {base!r}, which is not {_what(cfg)}")
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"LoRA tensors of {base!r}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a pair")
        if a.shape[1] != slot.cols or b.shape[0] != slot.rows:
            raise ValueError(
                f"LoRA tensors of {base!r}: A {tuple(a.shape)}, B {tuple(b.shape)}; the model's {base!r} is "
                f"{slot.rows}x{slot.cols} (an adapter of another model?)"
            )
        if slot.rope_heads is not None:
            b = unpermute_rope_rows(b, slot.rope_heads)
        by_module.setdefault(slot.module, []).append((slot, a, b * scales[base]))
    layers = {}
    for module, parts in by_module.items():
        out_rows = _module_rows(layout, module)
        r_all = sum(a.shape[0] for _, a, _ in parts)
        a_all = torch.cat([a for _, a, _ in parts]).to(torch.float64)  # (r_all, in)
        b_all = torch.zeros(out_rows, r_all, dtype=torch.float64)  # (out, r_all): block-diagonal in the parts' rows
        at = 0
        for slot, a, b in parts:
            b_all[slot.row : slot.row + slot.rows, at : at + a.shape[0]] = b
            at += a.shape[0]
        layers[module] = LoRAWeight(a_all.contiguous(), b_all)
    rank = max(a.shape[0] for a, _ in pairs.values())
    label = name or (p.name.removesuffix(".gguf") if p.is_file() else p.name)
    return LoRAAdapter(label, str(p), fmt, rank, alpha, layers, cfg.arch)


def _what(cfg: LMConfig) -> str:
    return (
        f"a projection of this {cfg.arch} model's {cfg.n_layers} blocks (LoRA applies to "
        "q/k/v/o and gate/up/down projections; not to embeddings, the LM head or norms)"
    )


def _slots(layout: Layout) -> dict[str, _Slot]:
    """Checkpoint tensor name -> its place among our block projections (the TARGETS)."""
    out = {}
    for ours, parts in layout.items():
        module = ours.removesuffix(".weight")
        if not (ours.startswith("blocks.") and ours.endswith(".weight") and module.endswith(TARGETS)):
            continue
        row = 0
        for part in parts:
            rows, cols = (part.shape[1], part.shape[0]) if part.transposed else part.shape
            out[part.name] = _Slot(module, row, rows, cols, part.rope_heads)
            row += rows
    return out


def _module_rows(layout: Layout, module: str) -> int:
    return sum(p.shape[1] if p.transposed else p.shape[0] for p in layout[module + ".weight"])


def _hf_layout(cfg: LMConfig, pairs: dict[str, Any]) -> Layout:
    spec = models.family(cfg.arch)
    return spec.hf_layout(cfg, list(pairs))


def _read_peft(d: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float], float]:
    """A PEFT folder's pairs (keyed by the base checkpoint tensor's name), each pair's scale, and lora_alpha."""
    from safetensors.torch import load_file

    cfg_file, weights = d / PEFT_CONFIG, d / PEFT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{d} is not a PEFT LoRA folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    conf: dict[str, Any] = json.loads(cfg_file.read_text())
    kind = str(conf.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ValueError(f"{d}: peft_type {kind!r} is not supported (LORA only)")
    refused: tuple[tuple[str, tuple[object, ...]], ...] = (
        ("use_dora", (False, None)),
        ("bias", ("none", None)),
        ("lora_bias", (False, None)),
        ("modules_to_save", (None, [])),
        ("trainable_token_indices", (None, [], {})),
        ("target_parameters", (None, [])),
        ("layer_replication", (None, [])),
    )
    for key, allowed in refused:
        if conf.get(key) not in allowed:
            raise ValueError(f"{d}: {key}={conf.get(key)!r} is not supported (LoRA pairs only: {allowed[0]!r})")
    alpha = float(conf.get("lora_alpha", 8))
    rslora = bool(conf.get("use_rslora", False))
    alpha_pattern: dict[str, float] = conf.get("alpha_pattern") or {}
    raw = load_file(str(weights))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _PEFT_PAIR.match(key)
        if m is None or not m["base"].startswith(_PEFT_PREFIX):
            raise ValueError(f"{d}: tensor {key!r} is not a LoRA pair's half (lora_A/lora_B of a base module)")
        base = m["base"].removeprefix(_PEFT_PREFIX) + ".weight"
        halves.setdefault(base, {})[m["half"]] = t.float()
    pairs = _pairs(halves, str(d), "A", "B")
    scales = {}
    for base, (a, _) in pairs.items():
        module = base.removesuffix(".weight")
        a_ = next((float(v) for k, v in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", module)), alpha)
        r = a.shape[0]
        scales[base] = a_ / math.sqrt(r) if rslora else a_ / r
    return pairs, scales, alpha


def _read_gguf(
    path: Path, cfg: LMConfig
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float], float]:
    """A GGUF LoRA's pairs (keyed by the base GGUF tensor's name), each pair's scale (llama.cpp's: alpha / r, or 1
    without an alpha) and its alpha."""
    from model_core.weights.gguf import dequantize_tensor
    from model_core.weights.gguf_reader import open_gguf

    file = open_gguf(path)
    meta = dict(file.metadata)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        got = (meta.get("general.type"), meta.get("adapter.type"))
        raise ValueError(f"{path} is not a GGUF LoRA adapter (general.type, adapter.type = {got})")
    arch = meta.get("general.architecture")
    if models.for_gguf(arch).name != cfg.arch:
        raise ValueError(f"{path} is a LoRA adapter of a {arch!r} model; this model is a {cfg.arch!r}")
    alpha = float(meta.get("adapter.lora.alpha") or 0.0)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in file.tensors:
        m = _GGUF_PAIR.match(t.name)
        if m is None:
            raise ValueError(f"{path}: tensor {t.name!r} is not a LoRA pair's half (<name>.weight.lora_a/lora_b)")
        halves.setdefault(m["base"], {})[m["half"]] = dequantize_tensor(t)  # a: (r, in); b: (out, r)
    pairs = _pairs(halves, str(path), "a", "b")
    scales = {base: alpha / a.shape[0] if alpha else 1.0 for base, (a, _) in pairs.items()}
    return pairs, scales, alpha


def _pairs(
    halves: dict[str, dict[str, torch.Tensor]], source: str, a: str, b: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for base, h in halves.items():
        if set(h) != {a, b}:
            missing = ({a, b} - set(h)).pop()
            raise ValueError(f"{source}: the LoRA pair of {base!r} lacks its lora_{missing} tensor")
        out[base] = (h[a], h[b])
    return out
