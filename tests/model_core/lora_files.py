"""Tiny LoRA adapters in the real formats: made with `peft` on the tiny HF llama (tests/model_core/tiny_formats.py),
saved as PEFT folders, and converted to llama.cpp's GGUF LoRA by llama.cpp's own convert_lora_to_gguf.py (found as
the peers' llama.cpp source provides it: env LLAMA_CONVERT_LORA, else under ~/.cache/aigc-peers)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from tests.model_core.tiny_formats import hf_with_state, tiny_hf_llama

BASE_SEED = 0
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig fields: rank 8 on every projection; rank 4 on a few (other rows of the fused qkv untouched)
ADAPTERS: dict[str, dict[str, Any]] = {
    "a": {"r": 8, "lora_alpha": 16, "target_modules": ALL_TARGETS},
    "b": {"r": 4, "lora_alpha": 12, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rs": {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj", "o_proj", "up_proj"], "use_rslora": True},
}


def base_model() -> PreTrainedModel:
    return tiny_hf_llama(seed=BASE_SEED)


def write_peft(path: Path, name: str, seed: int) -> Path:
    """The adapter `name` of ADAPTERS on the tiny llama, every lora_A and lora_B ~ N(0, 0.1) (B non-zero: an
    adapter that changes the logits), saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(**ADAPTERS[name], init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def merged(peft_dir: Path, state: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """HF transformers' tiny llama (with `state`, e.g. a quantized file's round-tripped weights) with the adapter
    merged by peft (`merge_and_unload`): the oracle."""
    from peft import PeftModel

    base = base_model() if state is None else hf_with_state(base_model(), state)
    return PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload().eval()


def find_lora_converter() -> Path | None:
    env = os.environ.get("LLAMA_CONVERT_LORA")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted(Path.home().glob(".cache/aigc-peers/*/sdist/*/vendor/llama.cpp/convert_lora_to_gguf.py"))
    return found[-1] if found else None


@dataclass
class Converted:
    path: Path | None
    log: str


def convert_to_gguf(script: Path, peft_dir: Path, hf_base_dir: Path, out: Path) -> Converted:
    """llama.cpp's convert_lora_to_gguf.py on a PEFT folder (f32 tensors), its own gguf-py first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parent / "gguf-py"), str(script.parent)]))
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(peft_dir), "--base", str(hf_base_dir), "--outfile", str(out)]
    proc = subprocess.run([*cmd, "--outtype", "f32"], env=env, capture_output=True, text=True, timeout=300)
    return Converted(out if proc.returncode == 0 and out.is_file() else None, proc.stdout + proc.stderr)
