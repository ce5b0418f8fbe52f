"""Prometheus metrics, named like vLLM's with the `aigc_` prefix, on a per-app registry.

Every series of an LM carries its `model` label. Latency histograms and token counters are fed by each LM's
engine through its own `EngineObserver` (`Metrics.observer(model)`: `on_first_token`, `on_token`, `on_finish`);
gauges (running, waiting, KV usage) are read from each loaded LM's engine at scrape time by a custom collector, so
they are never stale (an unloaded model's go with it); so are the prefix cache's counters, which the scheduler
keeps. Loads and unloads are counted per model, and `aigc_model_loaded` says which are loaded.

Beside them, from the same engine state, the gauges that the Gateway API Inference Extension's endpoint picker reads
under vLLM's names (its model server protocol): `vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc` (a fraction, 0-1, as vLLM's), `vllm:lora_requests_info` and `vllm:cache_config_info`. The
picker sees a pod, not a model, and reads one series per name (the first, when none carries a timestamp), so these
are one series per server, unlabelled, over every loaded LM: requests summed, KV usage over all their blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# the engine's state keys: SPEC_PER_POS/position, LORA_RUNNING/adapter, LORA_WAITING/adapter, LORA_MAX
from service.engine.engine import LORA_MAX, LORA_RUNNING, LORA_WAITING, SPEC_PER_POS

disable_created_metrics()  # no *_created series: they double the exposition for no use here

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)


SPEC_COUNTERS = {  # speculative decoding, as vLLM's spec_decode counters
    "aigc_spec_decode_num_drafts": "Drafts verified.",
    "aigc_spec_decode_num_draft_tokens": "Draft tokens proposed and verified.",
    "aigc_spec_decode_num_accepted_tokens": "Draft tokens kept.",
}


# The inference gateway's names (vLLM's) for our gauges: what its endpoint picker reads by default.
GATEWAY_GAUGES = {
    "vllm:num_requests_waiting": ("aigc_num_requests_waiting", "Requests waiting, over the loaded models."),
    "vllm:num_requests_running": ("aigc_num_requests_running", "Requests running, over the loaded models."),
    "vllm:kv_cache_usage_perc": ("aigc_kv_cache_usage_ratio", "KV cache blocks in use (0-1), over the loaded models."),
}
LORA_INFO = "vllm:lora_requests_info"
CACHE_CONFIG_INFO = "vllm:cache_config_info"


def _adapters(values: dict[str, float], key: str) -> set[str]:
    return {k.partition("/")[2] for k, v in values.items() if k.startswith(key + "/") and v}


def gateway_families(states: Iterable[dict[str, float]], now: float | None = None) -> Iterator[GaugeMetricFamily]:
    """The endpoint picker's gauges for this server: one unlabelled series each over the loaded LMs' states."""
    states = list(states)
    blocks = [s.get("kv_cache_blocks", 0.0) for s in states]
    for name, (ours, doc) in GATEWAY_GAUGES.items():
        if ours == "aigc_kv_cache_usage_ratio" and len(states) > 1:  # over all the LMs' blocks
            value = sum(s[ours] * n for s, n in zip(states, blocks, strict=True)) / max(sum(blocks), 1.0)
        else:
            value = sum(s[ours] for s in states)
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], value)
        yield g
    # vLLM's form: the adapters as comma-separated label values, the value the time they were read (the picker
    # takes the series with the largest); adapter slots add up over the LMs
    running = sorted(set().union(*(_adapters(s, LORA_RUNNING) for s in states)))
    waiting = sorted(set().union(*(_adapters(s, LORA_WAITING) for s in states)))
    lora = GaugeMetricFamily(
        LORA_INFO,
        "LoRA adapters running and waiting; the value is when they were read (Unix seconds).",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    max_lora = int(sum(s.get(LORA_MAX, 0.0) for s in states))
    lora.add_metric([",".join(running), ",".join(waiting), str(max_lora)], time.time() if now is None else now)
    yield lora
    if states:  # KV block size and count, for the picker's prefix-cache scorer
        info = GaugeMetricFamily(
            CACHE_CONFIG_INFO, "KV cache layout (labels); the value is 1.", labels=["block_size", "num_gpu_blocks"]
        )
        block_size = min(int(s.get("kv_cache_block_size", 0.0)) for s in states)
        info.add_metric([str(block_size), str(int(sum(blocks)))], 1.0)
        yield info


class _EngineGauges(Collector):
    """Each loaded LM's engine state, read at scrape time."""

    def __init__(self, engines: dict[str, Callable[[], dict[str, float]]]) -> None:
        self._engines = engines  # by model name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        read = [(model, state()) for model, state in list(self._engines.items())]
        docs = {
            "aigc_num_requests_running": "Requests in the running batch.",
            "aigc_num_requests_waiting": "Requests waiting to be scheduled.",
            "aigc_kv_cache_usage_ratio": "Fraction of KV cache blocks in use (0-1).",
        }
        for name, doc in docs.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            for model, values in read:
                g.add_metric([model], values[name])
            yield g
        counters = {  # cumulative counts the scheduler keeps
            "aigc_prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
            "aigc_prefix_cache_hits": "Prompt tokens found in the prefix cache (not computed).",
        }
        for name, doc in counters.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            for model, values in read:
                c.add_metric([model], values[name])
            yield c
        yield from gateway_families(values for _, values in read)
        spec = [(model, values) for model, values in read if "aigc_spec_decode_num_drafts" in values]
        if not spec:  # speculative decoding is off
            return
        for name, doc in SPEC_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            for model, values in spec:
                c.add_metric([model], values[name])
            yield c
        per_pos = CounterMetricFamily(
            SPEC_PER_POS, "Draft tokens kept, by their position in the draft (from 0).", labels=["model", "position"]
        )
        for model, values in spec:
            for key, v in values.items():
                if key.startswith(SPEC_PER_POS + "/"):
                    per_pos.add_metric([model, key.rpartition("/")[2]], v)
        yield per_pos


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "aigc_time_to_first_token_seconds", "Time to first token.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "aigc_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "aigc_e2e_request_latency_seconds",
            "Request latency from arrival to finish.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "aigc_request_queue_time_seconds",
            "Time from arrival to first schedule.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("aigc_prompt_tokens", "Prefilled prompt tokens.", ["model"], registry=r)
        self.generation_tokens = Counter("aigc_generation_tokens", "Generated tokens.", ["model"], registry=r)
        self.success = Counter(
            "aigc_request_success", "Finished requests by finish reason.", ["model", "finish_reason"], registry=r
        )
        self.rejected = Counter(
            "aigc_requests_rejected", "Requests rejected before running.", ["endpoint", "reason", "model"], registry=r
        )
        self.load_seconds = Gauge("aigc_model_load_seconds", "Time the model's last load took.", ["model"], registry=r)
        self.loaded = Gauge("aigc_model_loaded", "1 while the model is loaded, else 0.", ["model"], registry=r)
        self.loads = Counter("aigc_model_loads", "Model loads by result (ok, error).", ["model", "result"], registry=r)
        self.unloads = Counter(
            "aigc_model_unloads", "Model unloads by reason (requested, evicted).", ["model", "reason"], registry=r
        )
        self.image_requests = Counter("aigc_image_requests", "Image generation requests.", ["model"], registry=r)
        self.images = Counter("aigc_images_generated", "Images generated.", ["model"], registry=r)
        self.image_batch = Histogram(
            "aigc_image_batch_size",
            "Images per GAN forward pass.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.seq2seq_batch = Histogram(
            "aigc_seq2seq_batch_size",
            "Decoder rows per encoder-decoder batch.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self._engines: dict[str, Callable[[], dict[str, float]]] = {}
        r.register(_EngineGauges(self._engines))

    def bind_engine(self, model: str, state: Callable[[], dict[str, float]]) -> None:
        """Export this loaded LM's engine gauges (`state`: LLMEngine.state) under its name."""
        self._engines[model] = state

    def unbind_engine(self, model: str) -> None:
        self._engines.pop(model, None)

    def observer(self, model: str) -> ModelObserver:
        """The EngineObserver of one LM's engine: its requests' timings and tokens, labelled with its name."""
        return ModelObserver(self, model)

    def on_image_batch(self, model: str, size: int) -> None:
        self.image_batch.labels(model).observe(size)
        self.images.labels(model).inc(size)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelObserver:
    """One LM's EngineObserver (called from its requests' coroutines)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        m = metrics
        self.model = model
        self._queue, self._ttft, self._itl, self._e2e = (h.labels(model) for h in (m.queue, m.ttft, m.itl, m.e2e))
        self._prompt, self._generated = m.prompt_tokens.labels(model), m.generation_tokens.labels(model)
        self._success = m.success

    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None:
        self._queue.observe(queue_time)
        self._ttft.observe(ttft)
        self._prompt.inc(prompt_tokens)
        self._generated.inc()

    def on_token(self, itl: float) -> None:
        self._itl.observe(itl)
        self._generated.inc()

    def on_finish(self, reason: str, e2e: float) -> None:
        self._success.labels(self.model, reason).inc()
        self._e2e.observe(e2e)
