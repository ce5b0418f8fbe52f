"""A model that cannot be served ends `python -m service` with status 1 and one error line naming it and why.

A supervisor (systemd, Docker, Kubernetes) only sees the process: a server left running with /ready 503 is never
restarted. Each case starts the real server as a subprocess, as an operator would, and reads its stderr: a missing
path, random bytes with a .gguf suffix, a GGUF of an architecture or with a tokenizer the loaders do not support,
and a KV cache too small for one sequence of the default model. Expected errors log one line and no traceback; a
bug (an unexpected exception) keeps its traceback and still exits 1.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import gguf
import pytest

from service.config import Settings
from service.main import create_app
from tests.service.server_utils import serve_in_process

REPO = Path(__file__).resolve().parents[2]
EXIT_TIMEOUT_S = 180  # the KV cache case loads the whole default model first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m service --port <free> *args` (or `python -c code` with those arguments), run to its end."""
    argv = ["--port", str(_free_port()), *args]
    cmd = [sys.executable, "-m", "service", *argv] if code is None else [sys.executable, "-c", code, *argv]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,  # a server that keeps running fails the test here
    )


def _json_errors(stderr: str) -> list[dict[str, Any]]:
    """The error records of a JSON log (every stderr line must be one JSON object)."""
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return [r for r in records if r["level"] in ("error", "critical")]


def _the_one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1, exactly one error record and no traceback: return its message."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = _json_errors(proc.stderr)
    assert len(errors) == 1, errors
    assert "exception" not in errors[0], errors[0]
    message: str = errors[0]["message"]
    assert "\n" not in message
    return message


def _tiny_gguf(path: Path, monkeypatch: pytest.MonkeyPatch, *, arch: str | None = None, tokenizer: str = "") -> Path:
    """A tiny random llama GGUF (tests/model_core/tiny_formats.py) written as another `arch` or with another
    `tokenizer.ggml.model`: everything else in it is what the loaders read."""
    from tests.model_core.tiny_formats import tiny_hf_llama, write_gguf

    if tokenizer:
        real = gguf.GGUFWriter.add_tokenizer_model
        monkeypatch.setattr(gguf.GGUFWriter, "add_tokenizer_model", lambda self, _: real(self, tokenizer))
    write_gguf(tiny_hf_llama(), path, arch=arch)
    return path


def test_a_missing_model_path_exits_1_naming_it(tmp_path: Path) -> None:
    """The GAN and G2P stay on (the defaults): the LM's failure still ends the process."""
    path = tmp_path / "no-such-model.gguf"
    message = _the_one_error(_run("--model", str(path)))
    assert message.startswith(f"cannot load model {path}: "), message


def test_a_directory_that_is_no_model_exits_1_naming_it(tmp_path: Path) -> None:
    message = _the_one_error(_run("--model", str(tmp_path), "--enable-gan", "false", "--enable-g2p", "false"))
    assert message.startswith(f"cannot load model {tmp_path}: "), message
    assert "config.json" in message, message


def test_random_bytes_named_gguf_exit_1_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(random.Random(0).randbytes(64))
    message = _the_one_error(_run("--model", str(path), "--enable-gan", "false", "--enable-g2p", "false"))
    assert message.startswith(f"cannot load model {path}: "), message
    assert "gguf" in message.removeprefix(f"cannot load model {path}: ").lower(), message


def test_an_unsupported_gguf_architecture_exits_1_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny_gguf(tmp_path / "tiny-mamba.gguf", monkeypatch, arch="mamba")
    message = _the_one_error(_run("--model", str(path), "--enable-gan", "false", "--enable-g2p", "false"))
    assert message.startswith(f"cannot load model {path}: "), message
    assert "architecture" in message and "'mamba'" in message, message


def test_an_unsupported_tokenizer_exits_1_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny_gguf(tmp_path / "tiny-bert-tokenizer.gguf", monkeypatch, tokenizer="bert")
    message = _the_one_error(_run("--model", str(path), "--enable-gan", "false", "--enable-g2p", "false"))
    assert message.startswith(f"cannot load model {path}: "), message
    assert "tokenizer" in message and "'bert'" in message, message


def test_a_kv_cache_too_small_for_one_sequence_exits_1_saying_what_it_needs(smol_path: str) -> None:
    """The default model (8192-token context) in 0.02 GiB of KV cache: the line names the setting, the tokens it
    holds, the context it must hold and the budget that would."""
    proc = _run(
        "--kv-cache-memory-gb", "0.02", "--log-format", "text", "--enable-gan", "false", "--enable-g2p", "false"
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    name = Path(smol_path).name.removesuffix(".gguf")
    assert f"KV cache too small for model {name}: kv_cache_memory_gb=0.02 holds " in line, line
    assert "fewer than one sequence of max_model_len=8192" in line and "kv_cache_memory_gb >= " in line, line
    needed = float(line.split("kv_cache_memory_gb >= ")[1].split()[0])
    assert 0.02 < needed < 1.0, line


def test_models_that_cannot_be_served_together_exit_1_saying_why(tmp_path: Path) -> None:
    """Checked before anything loads: a budget smaller than one model, two models with one id."""
    (tmp_path / "a.gguf").write_bytes(b"x" * 1000)
    off = ("--enable-gan", "false", "--enable-g2p", "false")
    message = _the_one_error(_run("--models-dir", str(tmp_path), "--max-loaded-memory", "1MiB", *off))
    assert message.startswith("model a needs about 1.00 GiB") and "max_loaded_memory=0.00 GiB" in message, message
    message = _the_one_error(_run("--model", f"a={tmp_path}/x.gguf", "--models-dir", str(tmp_path), *off))
    assert message.startswith("two models have the id 'a'"), message


_BROKEN = """
import sys
import service.main as m

def boom(*args, **kwargs):
    raise {error}

m.{function} = boom
raise SystemExit(m.main(sys.argv[1:]))
"""


def test_an_unexpected_error_keeps_its_traceback_and_exits_1() -> None:
    code = _BROKEN.format(function="build_text_model", error='RuntimeError("a bug in a loader")')
    proc = _run("--enable-gan", "false", "--enable-g2p", "false", code=code)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = _json_errors(proc.stderr)
    assert len(errors) == 1, errors
    assert errors[0]["message"] == "cannot start the default model: RuntimeError: a bug in a loader", errors[0]
    assert "Traceback" in errors[0]["exception"] and "boom" in errors[0]["exception"]


def test_a_start_up_that_raises_stops_the_server_instead_of_serving_without_its_models() -> None:
    """An exception in the app's own start-up (here the GAN's batcher) ends the process too (uvicorn: status 3)."""
    code = _BROKEN.format(function="start_image_batcher", error='RuntimeError("a bug in the GAN batcher")')
    proc = _run(code=code)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "a bug in the GAN batcher" in proc.stderr


def test_in_process_the_failure_asks_the_server_to_stop_while_health_still_answers(tmp_path: Path) -> None:
    """Under `python -m service` the loader thread calls `app.state.server.stop_server` (uvicorn then exits 1); in the
    meantime, and in an app built without it, /health answers 200 and /ready 503 with the reason."""
    app = create_app(Settings(model=str(tmp_path / "missing.gguf"), enable_gan=False, enable_g2p=False))
    asked = threading.Event()
    app.state.server.stop_server = asked.set
    with serve_in_process(app) as live, live.client(timeout=30.0) as c:
        assert asked.wait(60), "the failed load did not ask the server to stop"
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503
        (reason,) = r.json()["reasons"]
        assert reason.startswith(f"model failed to load: cannot load model {tmp_path / 'missing.gguf'}: "), reason


def test_a_context_longer_than_the_kv_budget_is_capped_to_what_fits_unless_asked_for(
    smol_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The default model (8192-token context) in 0.09 GiB of KV cache (4192 tokens) without --max-model-len: served
    with max_model_len 4192 (the most that fits, as llama.cpp's and Ollama's default contexts), a warning saying so;
    with --max-model-len 8192 asked for, the start-up error of the test above (what it cannot honour)."""
    from service.main import StartupError, build_text_model

    settings = {"enable_gan": False, "enable_g2p": False, "kv_cache_memory_gb": 0.09}
    with caplog.at_level("WARNING", logger="service"):
        tm = build_text_model(Settings(**settings))  # (its engine not started)
    assert tm.max_model_len == 4192 and tm.engine.config.max_model_len == 4192
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "max_model_len" in r.msg]
    assert warning.startswith("max_model_len 4192: the most that kv_cache_memory_gb=0.09 holds"), warning
    assert "its context is 8192 tokens" in warning, warning
    with pytest.raises(StartupError, match="fewer than one sequence of max_model_len=8192"):
        build_text_model(Settings(**settings, max_model_len=8192))


def test_a_draft_model_of_another_vocabulary_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--speculative-method draft with a draft whose tokens are not the model's: a start-up error naming both; a
    draft model without the method (or the method without one) is a settings error."""
    from service.main import StartupError, build_text_model

    draft = _tiny_gguf(tmp_path / "draft.gguf", monkeypatch)
    settings = {"enable_gan": False, "enable_g2p": False, "speculative_method": "draft"}
    settings["speculative_model"] = str(draft)
    with pytest.raises(StartupError, match="another vocabulary than .*speculative decoding needs the same"):
        build_text_model(Settings(**settings))
    with pytest.raises(ValueError, match="speculative_model is the draft model"):
        Settings(speculative_model=str(draft))
    with pytest.raises(ValueError, match="speculative_model is the draft model"):
        Settings(speculative_method="draft")
