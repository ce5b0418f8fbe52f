"""The engine's text side: detokenizing and stop strings run on each request's coroutine (the event loop),
never on the step thread, and a stop string ends the request exactly where the reference `generate()` ends
it, with the step thread told to drop it."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

from model_core.generate import generate
from model_core.lm import CausalLM
from model_core.sampling import SamplingParams
from model_core.tokenizer import Tokenizer
from service.engine.engine import LLMEngine, TokenEvent
from tests.service.engine.engine_utils import make_engine


class Recorder:
    """An EngineObserver that counts what it is told, and from which thread."""

    def __init__(self) -> None:
        self.tokens = 0
        self.finishes: list[str] = []
        self.threads: set[int] = set()

    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None:
        self.tokens += 1
        self.threads.add(threading.get_ident())

    def on_token(self, itl: float) -> None:
        self.tokens += 1
        self.threads.add(threading.get_ident())

    def on_finish(self, reason: str, e2e: float) -> None:
        self.finishes.append(reason)
        self.threads.add(threading.get_ident())


def _reference(model: CausalLM, tok: Tokenizer, prompt: list[int], params: SamplingParams) -> tuple[str, str, int]:
    steps = list(generate(model, prompt, params, tokenizer=tok, eos_token_ids=tok.eos_token_ids))
    return "".join(s.text for s in steps), steps[-1].finish_reason or "", len(steps)


def _run(engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list[list[TokenEvent]], int]:
    """Run the jobs concurrently; also returns the thread the requests' coroutines ran on."""

    async def main() -> tuple[list[list[TokenEvent]], int]:
        async def one(p: list[int], sp: SamplingParams) -> list[TokenEvent]:
            return [ev async for ev in engine.generate(p, sp)]

        return list(await asyncio.gather(*(one(p, sp) for p, sp in jobs))), threading.get_ident()

    return asyncio.run(main())


def _wait_idle(engine: LLMEngine) -> None:
    deadline = time.monotonic() + 10
    while engine.scheduler.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.scheduler.has_work and engine.scheduler.kv_usage == 0.0


def test_stop_strings_end_requests_where_the_reference_does(tiny_model: CausalLM, smol_tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    jobs: list[tuple[list[int], SamplingParams]] = []
    expected = []
    for _ in range(8):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(2, 40))]
        full, _, _ = _reference(tiny_model, smol_tokenizer, prompt, SamplingParams(max_tokens=32, temperature=0.0))
        k = rng.randrange(1, max(2, len(full) - 3))
        stop = full[k : k + rng.randint(1, 3)] or full[-1:]  # a string the greedy output does contain
        params = SamplingParams(max_tokens=32, temperature=0.0, stop=(stop,))
        jobs.append((prompt, params))
        expected.append(_reference(tiny_model, smol_tokenizer, prompt, params))
    engine = make_engine(tiny_model, smol_tokenizer)
    recorder = Recorder()
    engine.observer = recorder
    decoded_on: set[int] = set()
    make_decoder = smol_tokenizer.incremental_decoder

    def recording_decoder(*args: Any, **kwargs: Any) -> Any:
        decoder = make_decoder(*args, **kwargs)
        step = decoder.step

        def recorded_step(token_id: int) -> str:
            decoded_on.add(threading.get_ident())
            return step(token_id)

        decoder.step = recorded_step  # type: ignore[method-assign]
        return decoder

    engine.tokenizer = type("T", (), {"incremental_decoder": staticmethod(recording_decoder)})()  # type: ignore[assignment]
    try:
        results, loop_thread = _run(engine, jobs)
        _wait_idle(engine)  # the requests a stop string ended were dropped by the step thread too
        step_thread = engine.core._thread.ident if engine.core._thread is not None else None
    finally:
        engine.stop()
    stopped = 0
    for events, (text, finish, n) in zip(results, expected, strict=True):
        assert "".join(e.text for e in events) == text
        assert events[-1].finish_reason == finish and events[-1].completion_tokens == n == len(events)
        stopped += finish == "stop"
    assert stopped >= 6, "the stop strings should end most of these requests"
    assert decoded_on == {loop_thread} and step_thread not in decoded_on
    assert recorder.threads == {loop_thread}
    assert recorder.tokens == sum(len(events) for events in results)  # tokens past a stop string are not counted
    assert sorted(recorder.finishes) == sorted(f for _, f, _ in expected)
