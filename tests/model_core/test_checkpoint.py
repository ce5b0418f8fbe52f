"""Checkpoint directories: what is written reads back exactly; a corrupt or mismatched one is refused by name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config, read_tensors, write_checkpoint


@dataclass(frozen=True)
class Cfg:
    width: int = 3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cfg:
        cfg = cls(**{k: v for k, v in d.items() if k != "training"})
        if cfg.width < 1:
            raise ValueError("width must be positive")
        return cfg


def _expected(cfg: Cfg) -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(cfg.width, 2), "b": torch.zeros(cfg.width), "n": torch.zeros((), dtype=torch.long)}


def _write(d: Path, cfg: Cfg = Cfg(), dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(cfg.width, 2, generator=g), "b": torch.randn(cfg.width, generator=g)}
    tensors["n"] = torch.tensor(7)
    assert write_checkpoint(d, asdict(cfg), tensors, model="test", extra={"seed": 0}, dtype=dtype) == d
    return tensors


def test_round_trip(tmp_path: Path) -> None:
    tensors = _write(tmp_path / "ck")
    cfg = read_config(tmp_path / "ck", "Test", Cfg.from_dict)
    assert cfg == Cfg() and json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())["training"] == {"seed": 0}
    got = read_tensors(tmp_path / "ck", _expected(cfg))
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    _write(tmp_path / "half", dtype=torch.float16)  # stored in float16, read back in the expected dtype
    assert load_file(str(tmp_path / "half" / WEIGHTS_FILE))["w"].dtype == torch.float16
    half = read_tensors(tmp_path / "half", _expected(cfg))
    assert half["w"].dtype == torch.float32 and half["n"].dtype == torch.long
    torch.testing.assert_close(half["w"], tensors["w"], atol=1e-3, rtol=1e-3)


def test_refuses_corrupt_and_mismatched_files(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    _write(d)
    raw = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_tensors(d, _expected(Cfg()))
    _write(d)
    with pytest.raises(ValueError, match=r"shapes do not match the config: w: file \(3, 2\) != expected \(4, 2\)"):
        read_tensors(d, _expected(Cfg(width=4)))
    with pytest.raises(ValueError, match=r"names do not match the config: missing=\['extra'\], unexpected=\[\]"):
        read_tensors(d, {**_expected(Cfg()), "extra": torch.zeros(1)})
    state = load_file(str(d / WEIGHTS_FILE))
    state["b"][1] = float("inf")
    save_file(state, str(d / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"NaN or infinite values: \['b'\]"):
        read_tensors(d, _expected(Cfg()))
    (d / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_config(d, "Test", Cfg.from_dict)
    (d / CONFIG_FILE).write_text("{oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_config(d, "Test", Cfg.from_dict)
    (d / CONFIG_FILE).write_text(json.dumps({"width": 0}))
    with pytest.raises(ValueError, match="invalid Test config: width must be positive"):
        read_config(d, "Test", Cfg.from_dict)
    (d / CONFIG_FILE).write_text(json.dumps({"depth": 1}))
    with pytest.raises(ValueError, match="invalid Test config"):  # the TypeError of an unknown key
        read_config(d, "Test", Cfg.from_dict)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"Test checkpoint incomplete: .*{WEIGHTS_FILE} is missing"):
        read_config(d, "Test", Cfg.from_dict)
