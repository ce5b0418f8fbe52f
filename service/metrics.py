"""Prometheus metrics, named like vLLM's with the `aigc_` prefix, on a per-app registry.

Latency histograms and token counters are fed by the engine through the `EngineObserver` methods
(`on_first_token`, `on_token`, `on_finish`); gauges (running, waiting, KV usage) are read from the
engine at scrape time by a custom collector, so they are never stale; so are the prefix cache's
counters, which the scheduler keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.engine.engine import SPEC_PER_POS  # the engine's state keys SPEC_PER_POS/position

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


class _EngineGauges(Collector):
    def __init__(self, model: Callable[[], str], read: Callable[[], dict[str, float] | None]) -> None:
        self._model, self._read = model, read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        values = self._read()
        if values is None:
            return
        docs = {
            "aigc_num_requests_running": "Requests in the running batch.",
            "aigc_num_requests_waiting": "Requests waiting to be scheduled.",
            "aigc_kv_cache_usage_ratio": "Fraction of KV cache blocks in use (0-1).",
        }
        for name, doc in docs.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric([self._model()], values[name])
            yield g
        counters = {  # cumulative counts the scheduler keeps
            "aigc_prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
            "aigc_prefix_cache_hits": "Prompt tokens found in the prefix cache (not computed).",
        }
        for name, doc in counters.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([self._model()], values[name])
            yield c
        if "aigc_spec_decode_num_drafts" not in values:  # speculative decoding is off
            return
        for name, doc in SPEC_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([self._model()], values[name])
            yield c
        per_pos = CounterMetricFamily(
            SPEC_PER_POS, "Draft tokens kept, by their position in the draft (from 0).", labels=["model", "position"]
        )
        for key, v in values.items():
            if key.startswith(SPEC_PER_POS + "/"):
                per_pos.add_metric([self._model(), key.rpartition("/")[2]], v)
        yield per_pos


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model = "unknown"
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
            "aigc_requests_rejected", "Requests rejected before running.", ["endpoint", "reason"], registry=r
        )
        self.load_seconds = Gauge(
            "aigc_model_load_seconds", "Time to load the model at start-up.", ["model"], registry=r
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
        self._engine_state: Callable[[], dict[str, float] | None] = lambda: None
        r.register(_EngineGauges(lambda: self.model, lambda: self._engine_state()))

    def bind_engine(self, model: str, state: Callable[[], dict[str, float]]) -> None:
        self.model = model
        self._engine_state = state

    # ---- EngineObserver ---------------------------------------------------------------------
    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None:
        self.queue.labels(self.model).observe(queue_time)
        self.ttft.labels(self.model).observe(ttft)
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc()

    def on_token(self, itl: float) -> None:
        self.itl.labels(self.model).observe(itl)
        self.generation_tokens.labels(self.model).inc()

    def on_finish(self, reason: str, e2e: float) -> None:
        self.success.labels(self.model, reason).inc()
        self.e2e.labels(self.model).observe(e2e)

    def on_image_batch(self, model: str, size: int) -> None:
        self.image_batch.labels(model).observe(size)
        self.images.labels(model).inc(size)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
