"""Which LMs a server serves, by name, before any loads (service.api.model_specs), the load budget's start-up checks
(service.api.model_registry.Budget) and the settings that give them (service.config): repeatable --model with
NAME=PATH, --models-dir, --served-model-name, --preload, sizes with units."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_core.default_model import DEFAULT_GGUF_NAME
from service.api.model_registry import Budget
from service.api.model_specs import ModelSpec, model_specs, preload_names
from service.config import Settings, parse_bytes, parse_settings
from service.main import StartupError, create_app


def _files(d: Path) -> dict[str, Path]:
    (d / "a.gguf").write_bytes(b"x" * 100)
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")
    (d / "hf" / "model.safetensors").write_bytes(b"y" * 50)
    (d / "no-weights").mkdir()
    (d / "no-weights" / "config.json").write_text("{}")
    (d / "notes.txt").write_text("not a model")
    (d / ".hidden.gguf").write_bytes(b"")
    return {"a": d / "a.gguf", "hf": d / "hf"}


def test_names_come_from_name_eq_path_or_the_file_and_folder_names(tmp_path: Path) -> None:
    f = _files(tmp_path)
    specs = model_specs([f"first={f['a']}", str(f["hf"])], None, None)
    assert [(s.name, s.path, s.weight_bytes) for s in specs] == [("first", str(f["a"]), 100), ("hf", str(f["hf"]), 50)]
    assert specs[0].label == f"model first ({f['a']})" and specs[1].label == f"model {f['hf']}"
    (only,) = model_specs([str(f["a"])], None, "my-id")  # one bare path: --served-model-name names it
    assert (only.name, only.label) == ("my-id", f"model {f['a']}")
    (default,) = model_specs([], None, None)
    assert default.name == DEFAULT_GGUF_NAME.removesuffix(".gguf") and default.label == "the default model"
    missing = model_specs(["/no/such/model.gguf"], None, None)[0]  # its load says it is missing
    assert (missing.name, missing.weight_bytes) == ("model", 0)
    odd = tmp_path / "a=b.gguf"
    odd.write_bytes(b"")
    assert model_specs([str(odd)], None, None)[0].name == "a=b"  # an existing path with '=' is a path


def test_models_dir_serves_every_gguf_file_and_hf_folder_after_the_models_given(tmp_path: Path) -> None:
    f = _files(tmp_path)
    other = tmp_path / "elsewhere.gguf"
    os.link(f["a"], other)
    assert [s.name for s in model_specs([f"x={other}"], str(tmp_path), None)] == ["x", "a", "elsewhere", "hf"]


@pytest.mark.parametrize(
    "models, models_dir, served, message",
    [
        (["{a}", "x={a}", "a={hf}"], None, None, "two models have the id 'a'"),
        (["{a}", "{hf}"], None, "one", "served_model_name names the only model served"),
        ([], "{d}/no-weights", None, "holds no model"),
        ([], "{d}/missing", None, "is not a directory"),
    ],
)
def test_models_that_cannot_be_served_together_are_start_up_errors(
    tmp_path: Path, models: list[str], models_dir: str | None, served: str | None, message: str
) -> None:
    f = _files(tmp_path)
    paths = {"a": f["a"], "hf": f["hf"], "d": tmp_path}
    with pytest.raises(ValueError, match=message):
        model_specs([m.format(**paths) for m in models], models_dir and models_dir.format(**paths), served)
    settings = Settings(model=[m.format(**paths) for m in models], models_dir=models_dir and models_dir.format(**paths))
    with pytest.raises(StartupError, match=message):
        create_app(settings.model_copy(update={"served_model_name": served, "enable_gan": False}))


def test_preload_is_the_first_model_by_default_all_none_or_names() -> None:
    names = ["a", "b", "c"]
    assert preload_names(None, names) == ["a"]
    assert preload_names(["all"], names) == names and preload_names(["none"], names) == []
    assert preload_names(["c", "a", "c"], names) == ["c", "a"]
    with pytest.raises(ValueError, match="preload names models not served: z; available: 'a', 'b', 'c'"):
        preload_names(["a", "z"], names)


def test_the_budget_refuses_a_model_larger_than_it_and_more_preloads_than_it_holds() -> None:
    a, b = ModelSpec("a", "/a", "model /a", 2**30), ModelSpec("b", "/b", "model /b", 2**29)
    kv = 2**28
    Budget(0, 2 * 2**30, kv).check([a, b], [a])
    with pytest.raises(ValueError, match=r"model a needs about 1.25 GiB .* more than max_loaded_memory=1.00 GiB"):
        Budget(0, 2**30, kv).check([a, b], [])
    with pytest.raises(ValueError, match="the preloaded models \\(a, b\\) do not fit max_loaded_models=1"):
        Budget(1, None, kv).check([a, b], [a, b])
    Budget(0, 2 * 2**30, kv).check([a, b], [a, b])  # 1.25 + 0.75 GiB: exactly fits
    with pytest.raises(ValueError, match="do not fit"):
        Budget(0, 2 * 2**30 - 1, kv).check([a, b], [a, b])
    assert Budget(2, None, kv).fits([a, b]) and not Budget(2, None, kv).fits([a, b, a])


def test_flags_repeat_model_and_take_sizes_with_units(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings(["--model", "a=/x.gguf", "--model", "/y", "--preload", "a,y", "--max-loaded-memory", "1.5GiB"])
    assert (s.model, s.preload, s.max_loaded_memory, s.max_loaded_models) == (
        ["a=/x.gguf", "/y"],
        ["a", "y"],
        3 << 29,
        4,
    )
    monkeypatch.setenv("AIGC_MODEL", "a=/x.gguf, /y")
    monkeypatch.setenv("AIGC_MAX_LOADED_MEMORY", "8G")
    monkeypatch.setenv("AIGC_MODELS_DIR", "/models")
    s = parse_settings([])
    assert (s.model, s.max_loaded_memory, s.models_dir, s.preload) == (["a=/x.gguf", "/y"], 8 * 10**9, "/models", None)
    assert [parse_bytes(t) for t in ("1024", "2k", "3KiB", "1MiB", "1e3")] == [1024, 2000, 3072, 2**20, 1000]
    for bad in ("lots", "1 parsec", "-1"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_bytes(bad)
