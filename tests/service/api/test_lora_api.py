"""LoRA adapters served by name (issue 29): `--lora-modules NAME=PATH[@MODEL]` and POST /v1/load_lora_adapter /
/v1/unload_lora_adapter (vLLM's routes, behind the API key). A tiny llama GGUF (Q8_0, on the native kernels where a
build runs) and two PEFT adapters of it (tests/model_core/lora_files.py, whose tests check them against peft's merge
in HF transformers): /v1/models lists each adapter with its parent; a request naming an adapter gets the model with
that adapter (the reference generate() with it, token for token), interleaved with the base's and the other's;
adapters added at run time survive their base's unload and reload; bad input is a 400/404 naming the field."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")

from model_core.generate import generate  # noqa: E402
from model_core.sampling import SamplingParams  # noqa: E402
from service.config import Settings  # noqa: E402
from service.main import StartupError, create_app  # noqa: E402
from tests.model_core.lora_files import base_model, write_peft  # noqa: E402
from tests.model_core.tiny_formats import write_gguf  # noqa: E402
from tests.service.http_checks import assert_error  # noqa: E402
from tests.service.server_utils import InProcessServer, serve_in_process  # noqa: E402

PROMPTS = ["The quick brown fox", "Hello world! Hello", "Transformers attend to", "Once upon a time there"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lora-api")
    write_gguf(base_model(), d / "base.gguf", "Q8_0")
    return {
        "base": str(d / "base.gguf"),
        "a": str(write_peft(d / "a", "a", seed=31)),
        "b": str(write_peft(d / "b", "b", seed=32)),
    }


@pytest.fixture
def serving() -> Iterator[Callable[..., InProcessServer]]:
    opened: list[Any] = []

    def start(**kw: Any) -> InProcessServer:
        small = {"kv_cache_memory_gb": 0.01, "max_model_len": 128, "enable_gan": False, "enable_g2p": False}
        cm = serve_in_process(create_app(Settings(**{**small, **kw})))
        live = cm.__enter__()
        opened.append(cm)
        with live.client() as c:
            deadline = time.monotonic() + 60
            while c.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        return live

    yield start
    for cm in reversed(opened):
        cm.__exit__(None, None, None)


def _complete(live: InProcessServer, model: str, prompt: str, **kw: Any) -> dict[str, Any]:
    with live.client() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _reference(live: InProcessServer, base: str, lora: str | None, prompt: str) -> str:
    """The reference generate() on the served model with the served adapter: its greedy text."""
    tm = live.lm(base)
    ids = tm.tokenizer.encode(prompt)
    adapter = tm.engine.loras[lora] if lora is not None else None
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    model = tm.engine.runner.model
    return tm.tokenizer.decode([s.token_id for s in generate(model, ids, params, kernels=model.kernels, lora=adapter)])


def _text(body: dict[str, Any]) -> str:
    text: str = body["choices"][0]["text"]
    return text


def test_adapters_are_models_of_their_own_over_their_base(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving(model=[f"base={files['base']}"], lora_modules=[f"a={files['a']}", f"b={files['b']}@base"])
    with live.client() as c:
        data = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert data["a"]["parent"] == "base" and data["a"]["root"] == files["a"] and data["b"]["parent"] == "base"
    assert "parent" not in data["base"]
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("base", "a", "b")]
    with ThreadPoolExecutor(6) as pool:  # interleaved: base and adapter rows share the engine's steps
        bodies = list(pool.map(lambda j: _complete(live, j[0], j[1], ignore_eos=True), jobs))
    for (model, prompt), body in zip(jobs, bodies, strict=True):
        assert body["model"] == model
        assert _text(body) == _reference(live, "base", None if model == "base" else model, prompt), (model, prompt)
    texts = {
        model: [_text(b) for (m, _), b in zip(jobs, bodies, strict=True) if m == model] for model in ("base", "a", "b")
    }
    assert texts["a"] != texts["base"] and texts["b"] != texts["base"]  # the adapters change the output
    chat = _chat(live, "a")
    assert chat["model"] == "a"
    with live.client() as c:  # what the inference gateway's endpoint picker reads: the adapters served here
        info = next(line for line in c.get("/metrics").text.splitlines() if line.startswith("vllm:lora_requests_info{"))
    assert 'running_lora_adapters="a,b"' in info and 'max_lora="2"' in info, info


def _chat(live: InProcessServer, model: str) -> dict[str, Any]:
    with live.client() as c:
        r = c.post("/tokenize", json={"model": model, "prompt": "hello"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and '"model":"' + model + '"' in r.text.replace(" ", "")
        return {"model": model}


def test_adapters_load_and_unload_at_run_time_behind_the_api_key(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving(model=[f"base={files['base']}"], api_keys=["k"])
    key = {"Authorization": "Bearer k"}
    with live.client(headers=key) as c:

        def load(**body: Any) -> Any:
            return c.post("/v1/load_lora_adapter", json=body)

        assert_error(c.post("/v1/load_lora_adapter", json={"lora_name": "a"}, headers={"Authorization": ""}), 401)
        r = load(lora_name="a", lora_path=files["a"])
        assert r.status_code == 200 and r.json() == {"success": True, "lora_name": "a", "base_model_name": "base"}
        assert "a" in {m["id"] for m in c.get("/v1/models").json()["data"]}
        before = _complete_with(c, "a")
        assert before != _complete_with(c, "base")
        assert_error(load(lora_name="a", lora_path=files["b"]), 400, "lora_name")
        assert_error(load(lora_name="x", lora_path="/no/such"), 400, "lora_path")
        assert_error(load(lora_name="x", lora_path=files["base"]), 400, "lora_path")
        err = assert_error(load(lora_name="x", lora_path=files["b"], base_model_name="zz"), 404)
        assert "'base'" in err["message"]
        assert_error(load(lora_name="x", lora_path=files["b"], rank=4), 400)
        # the base unloaded and loaded again: the adapter added at run time is served again, with the same output
        assert c.post("/models/unload", json={"model": "base"}).status_code == 200
        assert _complete_with(c, "a") == before
        assert_error(c.post("/models/unload", json={"model": "a"}), 400, "model", "model_not_unloadable")
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert r.status_code == 200 and r.json()["success"] is True
        assert_error(c.post("/v1/completions", json={"model": "a", "prompt": "x"}), 404, "model", "model_not_found")
        assert_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}), 404, code="model_not_found")


def _complete_with(c: Any, model: str) -> str:
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def test_bad_lora_modules_are_startup_errors(files: dict[str, str]) -> None:
    base = [f"base={files['base']}"]
    for entries, match in (
        ([f"a={files['a']}@nope"], "no model 'nope' is served"),
        (["no-equals-sign"], "expected NAME=PATH"),
        ([f"base={files['a']}"], "taken by a model"),
        ([f"a={files['a']}", f"a={files['b']}"], "taken by a model or another adapter"),
    ):
        with pytest.raises(StartupError, match=match):
            create_app(Settings(model=base, lora_modules=entries, enable_gan=False, enable_g2p=False))


def test_a_broken_adapter_fails_its_base_models_load_with_its_name(
    files: dict[str, str], serving: Callable[..., InProcessServer], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    live = serving(model=[f"base={files['base']}", f"other={files['base']}"], lora_modules=[f"bad={broken}@other"])
    with live.client() as c:
        assert _complete_with(c, "base")  # the first model, its own adapters none: served
        r = c.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        err = assert_error(r, 500, code="model_load_failed")
        assert "LoRA adapter bad" in err["message"]
