"""Several LMs in one server, by name (service.api.model_registry, model_table): real tiny models of different
families and formats (a llama GGUF, a GPT-2 GGUF, a llama safetensors folder: tests/model_core/tiny_formats.py),
loaded through the real loaders. Interleaved requests give each model's output alone (greedy); a budget of one
model evicts the least recently used idle one while requests for another wait (their queue time counts), or answers
503 when none becomes idle in time; a failing load is an error to every request waiting for it while the others are
served, and a later request tries again; an unloaded model finishes its requests in flight and loads again for new
ones; the 404/400 bodies, /v1/models' statuses, POST /models/load and /models/unload behind the API key, --models-dir
and the per-model metrics. The shipped SmolLM2 beside a tiny GPT-2 is the `heavy` test at the end."""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.main
from service.api.text_model import TextModel
from service.config import Settings
from service.main import create_app
from tests.model_core.tiny_formats import tiny_hf_gpt2, tiny_hf_llama, write_gguf, write_hf_dir
from tests.service.api.test_metrics import parse, value
from tests.service.http_checks import assert_error
from tests.service.server_utils import InProcessServer, serve_in_process

PROMPTS = ["The quick brown fox", "Hello world! Hello", "Transformers attend to", "Once upon a time there"]
BODY: dict[str, Any] = {"max_tokens": 10, "temperature": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three tiny LMs of two families in two formats, by the id each is served under."""
    d = tmp_path_factory.mktemp("models")
    write_gguf(tiny_hf_llama(), d / "llama.gguf", "Q8_0")
    write_gguf(tiny_hf_gpt2(), d / "gpt2.gguf", "Q8_0")
    write_hf_dir(tiny_hf_llama(seed=1), d / "hf-llama")
    return {"llama": str(d / "llama.gguf"), "gpt2": str(d / "gpt2.gguf"), "hf-llama": str(d / "hf-llama")}


def _settings(models: list[str], **kw: Any) -> Settings:
    small = {"kv_cache_memory_gb": 0.01, "max_model_len": 128, "enable_gan": False, "enable_g2p": False}
    return Settings(model=models, **{**small, **kw})


@pytest.fixture
def serving() -> Iterator[Callable[..., InProcessServer]]:
    """Serve `_settings(models, **kw)` in-process until the test ends, once its --preload models are loaded."""
    with _Servers() as servers:
        yield servers.start


class _Servers:
    def __init__(self) -> None:
        self._open: list[Any] = []

    def start(self, models: list[str], **kw: Any) -> InProcessServer:
        cm = serve_in_process(create_app(_settings(models, **kw)))
        live = cm.__enter__()
        self._open.append(cm)
        with live.client() as c:
            deadline = time.monotonic() + 60
            while (r := c.get("/ready")).status_code != 200:
                assert "failed" not in r.text and time.monotonic() < deadline, r.text
                time.sleep(0.02)
        return live

    def __enter__(self) -> _Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        for cm in reversed(self._open):
            cm.__exit__(None, None, None)


def _text(c: httpx.Client, model: str | None, prompt: str, **kw: Any) -> str:
    body = {**BODY, "prompt": prompt, **kw} | ({"model": model} if model else {})
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model or model is None
    text: str = r.json()["choices"][0]["text"]
    return text


def _statuses(c: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in c.get("/v1/models").json()["data"] if "status" in m}


def _slow_steps(tm: TextModel, seconds: float) -> None:
    """Every engine step of this loaded model takes `seconds` longer (a request on it stays in flight a while)."""
    runner = tm.engine.runner
    execute = runner.execute

    def slow(out: Any) -> Any:
        time.sleep(seconds)
        return execute(out)

    runner.execute = slow  # type: ignore[method-assign]


def _wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _metrics(c: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse(c.get("/metrics").text)


# ------------------------------------------------------------------------------------------------- serving
def test_models_of_two_families_interleaved_each_answer_as_served_alone(
    files: dict[str, str], serving: Callable[..., InProcessServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="service")
    alone = {}
    for name, path in files.items():
        with serving([path]).client() as c:
            alone[name] = [_text(c, None, p) for p in PROMPTS]  # the only model: no `model` needed
    live = serving([f"{n}={p}" for n, p in files.items()], preload=["all"])
    with live.client() as c:
        assert _statuses(c) == dict.fromkeys(files, "loaded")
        names = list(files)
        order = [(n, i) for i in range(len(PROMPTS)) for n in names]
        random.Random(0).shuffle(order)  # each model's prompts in order, the models' requests interleaved

        def run(name: str) -> list[str]:
            texts = {i: _text(c, name, PROMPTS[i]) for n, i in order if n == name}
            return [texts[i] for i in range(len(PROMPTS))]

        with ThreadPoolExecutor(len(names)) as pool:
            together = dict(zip(names, pool.map(run, names), strict=True))
        assert together == alone
        assert len({tuple(v) for v in alone.values()}) == len(alone)  # three different models
        samples = _metrics(c)
    for name in files:  # every per-model series carries its model's name
        assert value(samples, "aigc_generation_tokens_total", model=name) > 0
        assert value(samples, "aigc_request_success_total", model=name) == len(PROMPTS)
        assert value(samples, "aigc_model_loaded", model=name) == 1
        assert ("aigc_num_requests_running", frozenset({("model", name)})) in samples
        assert value(samples, "aigc_model_loads_total", model=name, result="ok") == 1
    access = [getattr(r, "fields", {}) for r in caplog.records if r.name == "service.access"]
    for name in files:  # each request's log line names its model
        assert sum(f.get("model") == name and f["path"] == "/v1/completions" for f in access) >= len(PROMPTS)
    loads = [r for r in caplog.records if r.name == "service.models" and r.getMessage().startswith("model llama ")]
    assert loads and getattr(loads[-1], "fields", {})["model"] == "llama"


def test_the_404_and_400_name_the_models_and_v1_models_lists_each_with_its_status(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving([f"a={files['llama']}", f"b={files['gpt2']}"], enable_g2p=True)
    with live.client() as c:
        data = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["kind"]) for m in data] == [("a", "text-generation"), ("b", "text-generation")] + [
            ("cmudict-g2p", "seq2seq")
        ]
        a, b = data[0], data[1]
        assert a["status"] == {"value": "loaded"} and a["loaded"] is True and a["max_model_len"] == 128
        assert b["status"] == {"value": "unloaded"} and b["loaded"] is False and "max_model_len" not in b
        assert c.get("/v1/models/b").json() == b
        for path, body in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/tokenize", {"prompt": "hi"}),
        ):
            err = assert_error(c.post(path, json=body), 400, param="model", code="model_required")
            assert "'a', 'b'" in err["message"], err
            err = assert_error(c.post(path, json={**body, "model": "c"}), 404, param="model", code="model_not_found")
            assert "The model 'c' does not exist" in err["message"] and "'a', 'b'" in err["message"]
        assert_error(c.get("/tokenizer_info"), 400, code="model_required")
        assert c.get("/tokenizer_info", params={"model": "b"}).json()["model"] == "b"  # loaded it
        assert_error(c.get("/v1/models/c"), 404, code="model_not_found")
        g2p = c.post("/v1/completions", json={"model": "cmudict-g2p", "prompt": "cat"})  # no LM is picked for it
        assert g2p.status_code == 200 and _statuses(c) == {"a": "loaded", "b": "loaded"}


# ---------------------------------------------------------------------------------------- load and evict
@pytest.mark.parametrize("budget", ["max_loaded_models", "max_loaded_memory"])
def test_a_budget_of_one_model_evicts_the_idle_one_while_requests_for_another_wait(
    budget: str, files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    # each model: about 0.15 MiB of weights + a 10 MiB KV pool
    limit = {"max_loaded_models": 1} if budget == "max_loaded_models" else {"max_loaded_models": 0}
    if budget == "max_loaded_memory":
        limit["max_loaded_memory"] = 12 * 2**20
    live = serving([f"a={files['llama']}", f"b={files['gpt2']}"], **limit)
    _slow_steps(live.lm("a"), 0.05)
    with live.client() as c, ThreadPoolExecutor(3) as pool:
        busy = pool.submit(_text, c, "a", PROMPTS[0], max_tokens=30, ignore_eos=True)
        _wait_until(lambda: live.lm("a").engine.scheduler.num_running == 1)
        waiting = [pool.submit(_text, c, "b", p) for p in PROMPTS[:2]]
        time.sleep(0.3)
        assert not any(f.done() for f in waiting)  # a is busy: it stays, b waits
        assert _statuses(c) == {"a": "loaded", "b": "unloaded"}
        assert busy.result(30) and [f.result(30) for f in waiting]
        assert _statuses(c) == {"a": "unloaded", "b": "loaded"}  # a was evicted for b once idle
        samples = _metrics(c)
    assert value(samples, "aigc_model_unloads_total", model="a", reason="evicted") == 1
    assert value(samples, "aigc_model_loaded", model="a") == 0 and value(samples, "aigc_model_loaded", model="b") == 1
    assert ("aigc_num_requests_running", frozenset({("model", "a")})) not in samples  # its gauges went with it
    # the waiting requests' queue time counts the wait for a's request and b's load (about 1.5 s)
    assert value(samples, "aigc_request_queue_time_seconds_sum", model="b") > 2 * 0.5


def test_the_least_recently_used_idle_model_is_the_one_unloaded(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    models = [f"{n}={p}" for n, p in files.items()]  # llama, gpt2, hf-llama
    live = serving(models, max_loaded_models=2, preload=["llama", "gpt2"])
    with live.client() as c:
        _text(c, "gpt2", "hi")
        _text(c, "llama", "hi")  # gpt2 is now the least recently used
        _text(c, "hf-llama", "hi")
        assert _statuses(c) == {"llama": "loaded", "gpt2": "unloaded", "hf-llama": "loaded"}
        _text(c, "gpt2", "hi")
        assert _statuses(c) == {"llama": "unloaded", "gpt2": "loaded", "hf-llama": "loaded"}


def test_when_no_model_becomes_idle_in_the_queue_timeout_the_request_gets_a_503(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving([f"a={files['llama']}", f"b={files['gpt2']}"], max_loaded_models=1, queue_timeout_s=0.5)
    _slow_steps(live.lm("a"), 0.05)
    with live.client() as c, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(_text, c, "a", PROMPTS[0], max_tokens=40, ignore_eos=True)
        _wait_until(lambda: live.lm("a").engine.scheduler.num_running == 1)
        r = c.post("/v1/completions", json={**BODY, "model": "b", "prompt": "hi"})
        err = assert_error(r, 503, code="model_capacity")
        assert "model b cannot be loaded" in err["message"] and "a (1 in flight)" in err["message"]
        assert r.headers["retry-after"]
        busy.result(30)
        body = {**BODY, "model": "b", "prompt": "hi"}
        _wait_until(lambda: c.post("/v1/completions", json=body).status_code == 200)  # a idle: evicted for b (the
        # load may take longer than the queue timeout here: a 503 model_loading until it is done)
        assert _statuses(c) == {"a": "unloaded", "b": "loaded"}
        # (1 at least: a retry above may meet a again while it is still unloading, when a load is slow)
        assert value(_metrics(c), "aigc_requests_rejected_total", reason="model_capacity", model="b") >= 1


def test_a_failing_load_errors_every_waiting_request_and_the_others_are_served(
    files: dict[str, str],
    serving: Callable[..., InProcessServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    build = service.main.build_text_model
    loading = threading.Event()

    def slow_build(settings: Settings, observer: Any = None) -> TextModel:
        loading.set()
        time.sleep(0.5)  # the requests for it all arrive while it loads
        return build(settings, observer)

    monkeypatch.setattr(service.main, "build_text_model", slow_build)
    live = serving([f"good={files['llama']}", str(corrupt)])
    with live.client() as c, ThreadPoolExecutor(3) as pool:
        body = {**BODY, "model": "corrupt", "prompt": "hi"}
        first = pool.submit(c.post, "/v1/completions", json=body)
        assert loading.wait(10)
        rest = [pool.submit(c.post, "/v1/completions", json=body) for _ in range(2)]
        for r in [first.result(30), *(f.result(30) for f in rest)]:
            err = assert_error(r, 500, code="model_load_failed")
            assert err["message"].startswith(f"cannot load model {corrupt}: "), err
        assert _text(c, "good", "hi")  # the server serves the others
        assert c.get("/ready").status_code == 200
        entry = c.get("/v1/models/corrupt").json()
        assert entry["status"]["value"] == "unloaded" and entry["status"]["failed"] is True
        assert value(_metrics(c), "aigc_model_loads_total", model="corrupt", result="error") == 1  # one load, 3 waits
        corrupt.write_bytes(Path(files["gpt2"]).read_bytes())  # fixed: the next request loads it
        assert _text(c, "corrupt", "hi")
        assert c.get("/v1/models/corrupt").json()["status"] == {"value": "loaded"}


def test_an_unloaded_model_finishes_its_requests_and_new_ones_load_it_again(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving([f"a={files['llama']}", f"b={files['gpt2']}"])
    alone = _text(live.client(), "a", PROMPTS[1])
    first = live.lm("a")
    _slow_steps(first, 0.05)
    with live.client() as c, ThreadPoolExecutor(3) as pool:
        busy = pool.submit(c.post, "/v1/completions", json={**BODY, "model": "a", "prompt": "x", "max_tokens": 30})
        _wait_until(lambda: live.lm("a").engine.scheduler.num_running == 1)
        unload = pool.submit(c.post, "/models/unload", json={"model": "a"})
        _wait_until(lambda: _statuses(c)["a"] == "unloading")
        later = pool.submit(_text, c, "a", PROMPTS[1])
        time.sleep(0.2)
        assert not unload.done() and not later.done()  # the request in flight holds it; the new one waits
        r = busy.result(30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30  # finished whole
        assert unload.result(30).json()["success"] is True
        assert later.result(30) == alone  # loaded again
        assert live.lm("a") is not first and not first.engine.is_alive
        weights = weakref.ref(first.engine.runner.model)
        del first, busy, unload
        gc.collect()
        assert weights() is None  # the unloaded model's memory is freed
        samples = _metrics(c)
    assert value(samples, "aigc_model_loads_total", model="a", result="ok") == 2
    assert value(samples, "aigc_model_unloads_total", model="a", reason="requested") == 1


def test_load_and_unload_routes_are_behind_the_api_key(
    files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    live = serving([f"a={files['llama']}", f"b={files['gpt2']}"], api_keys=["k"], enable_g2p=True)
    key = {"Authorization": "Bearer k"}
    with live.client() as c:
        for path in ("/models/load", "/models/unload"):
            assert_error(c.post(path, json={"model": "b"}), 401, code="invalid_api_key")
        assert c.get("/v1/models", headers=key).json()["data"][1]["status"] == {"value": "unloaded"}
        r = c.post("/models/load", json={"model": "b"}, headers=key)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True and r.json()["id"] == "b" and r.json()["status"] == {"value": "loaded"}
        assert c.get("/v1/models/b", headers=key).json()["loaded"] is True
        r = c.post("/models/unload", json={"model": "b"}, headers=key)
        assert r.status_code == 200 and r.json()["status"] == {"value": "unloaded"}
        again = c.post("/models/unload", json={"model": "b"}, headers=key)  # not loaded: nothing to do
        assert again.status_code == 200 and again.json()["status"] == {"value": "unloaded"}
        err = assert_error(c.post("/models/load", json={"model": "zz"}, headers=key), 404, code="model_not_found")
        assert "'a', 'b'" in err["message"]
        assert_error(c.post("/models/load", json={}, headers=key), 400, param="model")
        assert_error(c.post("/models/unload", json={"model": "cmudict-g2p"}, headers=key), 400, param="model")


def test_models_dir_serves_every_model_in_it(files: dict[str, str], tmp_path: Path) -> None:
    for path in files.values():
        (tmp_path / Path(path).name).symlink_to(path)
    (tmp_path / "README.txt").write_text("not a model")
    (tmp_path / "empty-folder").mkdir()
    with (
        serve_in_process(create_app(_settings([], models_dir=str(tmp_path), preload=["none"]))) as live,
        live.client() as c,
    ):
        assert _statuses(c) == {"gpt2": "unloaded", "hf-llama": "unloaded", "llama": "unloaded"}
        assert c.get("/ready").json()["models"] == ["gpt2", "hf-llama", "llama"]
        for name in ("llama", "hf-llama"):
            assert _text(c, name, "hi")
        assert _statuses(c) == {"gpt2": "unloaded", "hf-llama": "loaded", "llama": "loaded"}


# ---------------------------------------------------------------------------------------- the real model
@pytest.mark.heavy
def test_smollm2_and_a_tiny_gpt2_interleaved_each_answer_as_served_alone(
    smol_path: str, files: dict[str, str], serving: Callable[..., InProcessServer]
) -> None:
    """The shipped SmolLM2 (llama family, Q4_1) and a tiny GPT-2 in one server: SmolLM2's answers while it is the
    only model loaded equal its answers interleaved with the GPT-2's, which equal that model's in a server of
    its own."""
    with serving([files["gpt2"]]).client() as c:
        gpt2_alone = [_text(c, None, p) for p in PROMPTS]
    live = serving([f"smol={smol_path}", f"gpt2={files['gpt2']}"], max_model_len=256, kv_cache_memory_gb=0.05)
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12}
    with live.client() as c:
        smol_alone = [_text(c, "smol", p) for p in PROMPTS]
        smol_chat = c.post("/v1/chat/completions", json={**chat, "model": "smol", "temperature": 0}).json()
        assert _statuses(c) == {"smol": "loaded", "gpt2": "unloaded"}

        def smol() -> list[Any]:
            texts = [_text(c, "smol", p) for p in PROMPTS]
            r = c.post("/v1/chat/completions", json={**chat, "model": "smol", "temperature": 0})
            return [texts, r.json()["choices"][0]["message"]["content"]]

        with ThreadPoolExecutor(2) as pool:
            both = pool.submit(smol)
            gpt2 = [_text(c, "gpt2", p) for p in PROMPTS]
            assert both.result(120) == [smol_alone, smol_chat["choices"][0]["message"]["content"]]
        assert gpt2 == gpt2_alone
        assert "Paris" in smol_chat["choices"][0]["message"]["content"]
