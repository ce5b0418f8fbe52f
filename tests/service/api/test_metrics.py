"""Metrics move as they should: after known requests the counters and histograms hold the right counts (in-process;
the rejection test drops a stream mid-way, so it runs on a live socket)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from service.config import Settings
from service.main import create_app
from tests.service.server_utils import serve, serve_in_process, text_model

SAMPLE = re.compile(r"^(?P<name>[a-z_0-9]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>[-+0-9.e]+|NaN)$")


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m is None:
            continue
        labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'[a-z_]+="[^"]*"', m["labels"] or ""))
        labels = frozenset((k, v.strip('"')) for k, v in labels)
        out[(m["name"], labels)] = float(m["value"])
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def make_app(tiny_model, smol_tokenizer):
    return create_app(
        Settings(enable_gan=False), text_model=text_model(tiny_model, smol_tokenizer, max_num_seqs=4, max_waiting=0)
    )


@pytest.fixture(scope="module")
def server(tiny_model, smol_tokenizer):
    with serve_in_process(make_app(tiny_model, smol_tokenizer)) as live:
        yield live


@pytest.fixture
def live_server(tiny_model, smol_tokenizer):
    with serve(make_app(tiny_model, smol_tokenizer)) as live:
        yield live


def test_counters_and_histograms_count_known_requests(server) -> None:
    c = server.client(timeout=60)
    before = parse(c.get("/metrics").text)
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25]]
    for ids in prompts:
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    r = c.post(
        "/v1/completions",
        json={"prompt": [5, 6], "max_tokens": 9, "temperature": 0, "ignore_eos": True, "stop_token_ids": []},
    )
    assert r.status_code == 200
    after = parse(c.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("aigc_prompt_tokens_total") == 3 + 5 + 2
    assert delta("aigc_generation_tokens_total") == 6 + 6 + 9
    assert delta("aigc_request_success_total", finish_reason="length") == 3
    assert delta("aigc_time_to_first_token_seconds_count") == 3
    assert delta("aigc_e2e_request_latency_seconds_count") == 3
    assert delta("aigc_request_queue_time_seconds_count") == 3
    assert delta("aigc_inter_token_latency_seconds_count") == 5 + 5 + 8  # gaps between tokens
    assert delta("aigc_time_to_first_token_seconds_sum") > 0
    # the +Inf bucket of a histogram equals its count
    assert delta("aigc_e2e_request_latency_seconds_bucket", le="+Inf") == 3
    # gauges are read from the engine at scrape time: idle now
    assert value(after, "aigc_num_requests_running") == 0
    assert value(after, "aigc_kv_cache_usage_ratio") == 0


def test_rejections_are_counted_by_endpoint_and_reason(live_server) -> None:
    c = httpx.Client(base_url=live_server.base_url, timeout=60)
    before = parse(c.get("/metrics").text)
    # max_waiting=0 and 4 running slots: n=8 choices can never be admitted (400); once a stream of
    # n=4 holds every slot, one more request is refused for capacity (503)
    r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "n": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    with c.stream(
        "POST",
        "/v1/completions",
        json={"prompt": [1, 2], "max_tokens": 200, "ignore_eos": True, "n": 4, "stream": True},
    ) as s:
        lines = s.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"]
    deadline = time.monotonic() + 10
    while True:  # the dropped stream's abort reaches the engine within a step
        after = parse(c.get("/metrics").text)
        aborted = value(after, "aigc_request_success_total", finish_reason="abort") - value(
            before, "aigc_request_success_total", finish_reason="abort"
        )
        if aborted >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert aborted == 4  # the n=4 stream's choices
    assert (
        value(after, "aigc_requests_rejected_total", endpoint="chat", reason="queue_full")
        - value(before, "aigc_requests_rejected_total", endpoint="chat", reason="queue_full")
        == 1
    )


def test_model_load_time_is_exported(server) -> None:
    with server.client() as c:
        samples = parse(c.get("/metrics").text)
    assert any(n == "aigc_model_load_seconds" for n, _ in samples)


def test_inference_gateway_reads_vllm_named_gauges_equal_to_ours(live_server) -> None:
    """The Gateway API Inference Extension's endpoint picker reads vLLM's names: present, one unlabelled series each,
    parseable by prometheus_client's text parser, and equal to our per-model gauges (one LM here), read mid-stream."""
    from prometheus_client.parser import text_string_to_metric_families

    c = httpx.Client(base_url=live_server.base_url, timeout=60)
    body = {"prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True, "n": 3, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for line in ("# TYPE vllm:num_requests_waiting gauge", "# TYPE vllm:lora_requests_info gauge"):
        assert line in text.splitlines()  # the names as written, not escaped or mangled
    for name, ours in (
        ("vllm:num_requests_waiting", "aigc_num_requests_waiting"),
        ("vllm:num_requests_running", "aigc_num_requests_running"),
        ("vllm:kv_cache_usage_perc", "aigc_kv_cache_usage_ratio"),
    ):
        assert families[name].type == "gauge"
        (sample,) = families[name].samples
        assert sample.name == name and sample.labels == {}
        assert sample.value == sum(s.value for s in families[ours].samples)
    assert families["vllm:num_requests_running"].samples[0].value >= 1  # the stream is running
    assert 0 < families["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    lora = families["vllm:lora_requests_info"]
    assert lora.type == "gauge"
    (sample,) = lora.samples
    assert sample.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "0"}
    assert abs(sample.value - time.time()) < 60  # when it was read, as vLLM's
    (info,) = families["vllm:cache_config_info"].samples
    assert int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0


def test_gateway_gauges_cover_every_loaded_model_and_the_lora_hook() -> None:
    """Two LMs: requests add up, KV usage is over both pools' blocks, adapters from the engine state's LoRA keys."""
    from service.engine.engine import LORA_MAX, LORA_RUNNING, LORA_WAITING
    from service.metrics import gateway_families

    def state(waiting: float, running: float, kv: float, blocks: float, **extra: float) -> dict[str, float]:
        return {
            "aigc_num_requests_waiting": waiting,
            "aigc_num_requests_running": running,
            "aigc_kv_cache_usage_ratio": kv,
            "kv_cache_blocks": blocks,
            "kv_cache_block_size": 16.0,
            **extra,
        }

    a = state(1, 2, 0.5, 100, **{LORA_MAX: 4.0, f"{LORA_RUNNING}/sql": 1.0, f"{LORA_WAITING}/chat": 1.0})
    b = state(3, 4, 0.0, 300, **{LORA_MAX: 2.0, f"{LORA_RUNNING}/chat": 1.0, f"{LORA_RUNNING}/b": 1.0})
    fams = {f.name: f.samples for f in gateway_families([a, b], now=123.0)}
    assert fams["vllm:num_requests_waiting"][0].value == 4
    assert fams["vllm:num_requests_running"][0].value == 6
    assert fams["vllm:kv_cache_usage_perc"][0].value == 50 / 400
    (lora,) = fams["vllm:lora_requests_info"]
    assert lora.value == 123.0
    assert lora.labels == {"running_lora_adapters": "b,chat,sql", "waiting_lora_adapters": "chat", "max_lora": "6"}
    assert fams["vllm:cache_config_info"][0].labels == {"block_size": "16", "num_gpu_blocks": "400"}
    # no LM loaded: still every gauge the picker needs, at zero
    fams = {f.name: f.samples for f in gateway_families([], now=1.0)}
    assert [fams[n][0].value for n in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")] == [0, 0]
    assert fams["vllm:lora_requests_info"][0].labels["max_lora"] == "0"
    assert "vllm:cache_config_info" not in fams
