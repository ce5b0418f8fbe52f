"""The engine's request side on its own: `EngineOutput`s made here (as the engine core would send them) -> the
`TokenEvent`s the API gets. No model and no step thread: text, stop strings, usage and timings are all decided
on this side."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from typing import Any

from model_core.sampling import TokenScore
from model_core.stopping import OutputStream
from model_core.tokenizer import Tokenizer
from service.engine.engine_output import EngineOutput
from service.engine.errors import ErrorKind, internal_error
from service.engine.output_processor import OutputProcessor, RequestTimer, TokenEvent, mailbox
from service.engine.scheduler import FinishReason

TEXT = "The cat sat on the mat. The dog sat on the log."


class Timings:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[float | int | str, ...]]] = []

    def on_first_token(self, queue_time: float, ttft: float, prompt_tokens: int) -> None:
        self.calls.append(("first", (queue_time, ttft, prompt_tokens)))

    def on_token(self, itl: float) -> None:
        self.calls.append(("token", (itl,)))

    def on_finish(self, reason: str, e2e: float) -> None:
        self.calls.append(("finish", (reason,)))


def _processor(tok: Tokenizer, stop: tuple[str, ...], observer: Timings | None = None) -> OutputProcessor:
    stream = OutputStream(100, stop, tok.eos_token_ids, tok.incremental_decoder())
    return OutputProcessor("r", stream, RequestTimer(observer, 10.0, 3))


def _outputs(ids: list[int], last: FinishReason | None) -> list[EngineOutput]:
    """The core's outputs for these tokens: one per step, 0.25 s apart; `last` ends the final one."""
    return [
        EngineOutput(
            "r",
            t,
            last if i == len(ids) - 1 else None,
            num_prompt_tokens=3,
            num_cached_tokens=1,
            num_output_tokens=i + 1,
            time=11.0 + 0.25 * i,
            logprob=-0.5,
            top_logprobs=((t, -0.5),),
            queue_time=0.5 if i == 0 else None,
        )
        for i, t in enumerate(ids)
    ]


def _run(proc: OutputProcessor, outputs: list[EngineOutput]) -> list[TokenEvent]:
    events = []
    for out in outputs:
        events.append(proc.process(out))
        if events[-1].finish_reason is not None:
            break
    return events


def test_a_stop_string_ends_the_request_the_core_did_not_end(smol_tokenizer: Tokenizer) -> None:
    ids = smol_tokenizer.encode(TEXT, add_special_tokens=False)
    events = _run(_processor(smol_tokenizer, ("on the",)), _outputs(ids, None))
    assert "".join(e.text for e in events) == TEXT[: TEXT.index("on the")]
    assert events[-1].finish_reason == "stop" and len(events) < len(ids)
    assert [e.completion_tokens for e in events] == list(range(1, len(events) + 1))
    assert all(e.prompt_tokens == 3 and e.cached_tokens == 1 and e.top_logprobs == [(e.token_id, -0.5)] for e in events)


def test_the_cores_finish_releases_the_text_held_back_for_a_stop_string(smol_tokenizer: Tokenizer) -> None:
    head = TEXT[: TEXT.index(" the")]  # "... sat on": "on" could still grow into the stop string "on the"
    ids = smol_tokenizer.encode(head, add_special_tokens=False)
    going_on = _run(_processor(smol_tokenizer, ("on the",)), _outputs(ids, None))
    assert "".join(e.text for e in going_on) == head.removesuffix("on")  # held back
    ended = _run(_processor(smol_tokenizer, ("on the",)), _outputs(ids, FinishReason.LENGTH))
    assert "".join(e.text for e in ended) == head  # released when the core ends the request
    assert len(ended) == len(ids) and ended[-1].finish_reason == "length"


def test_errors_and_scored_prompts_carry_the_cores_usage(smol_tokenizer: Tokenizer) -> None:
    error = internal_error("model step failed: boom")
    ev = _processor(smol_tokenizer, ()).process(
        EngineOutput("r", None, FinishReason.ERROR, 3, 1, 2, time=12.0, error=error)
    )
    assert (ev.token_id, ev.text, ev.finish_reason, ev.error) == (None, "", "error", error)
    assert (ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens) == (3, 1, 2)
    assert ev.error is not None and ev.error.kind is ErrorKind.INTERNAL
    scores: list[TokenScore | None] = [None, TokenScore(-1.0, 2, ((7, -0.5),)), TokenScore(-0.1, 1, ())]
    ev = _processor(smol_tokenizer, ()).process(
        EngineOutput("r", None, FinishReason.LENGTH, 3, 0, 0, time=12.0, prompt_logprobs=scores)
    )
    assert (ev.token_id, ev.finish_reason, ev.prompt_logprobs, ev.completion_tokens) == (None, "length", scores, 0)


def test_timings_come_from_the_times_the_core_stamped(smol_tokenizer: Tokenizer) -> None:
    timings = Timings()
    ids = smol_tokenizer.encode("The cat sat", add_special_tokens=False)
    proc = _processor(smol_tokenizer, (), timings)
    events = _run(proc, _outputs(ids, FinishReason.STOP))
    assert events[0].queue_time == 0.5 and all(e.queue_time is None for e in events[1:])
    assert timings.calls == [("first", (0.5, 1.0, 3))] + [("token", (0.25,))] * (len(ids) - 1)
    proc.timer.finish("stop")
    proc.timer.finish("abort")  # once only
    assert timings.calls[-1] == ("finish", ("stop",)) and len(timings.calls) == len(ids) + 1


def test_the_mailbox_hands_a_threads_outputs_over_in_order_waking_the_loop_less_than_once_each() -> None:
    """Outputs posted from another thread (as the step thread does) for several requests' queues all arrive, each
    queue's in the order posted, and the loop is woken at most once per output (fewer where they come together)."""

    async def main() -> tuple[list[list[int]], int, int]:
        loop = asyncio.get_running_loop()
        box = mailbox(loop)
        assert mailbox(loop) is box  # one per loop
        queues: list[asyncio.Queue[EngineOutput]] = [asyncio.Queue() for _ in range(5)]
        wakes = 0
        plain = loop.call_soon_threadsafe

        def counted(*args: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return plain(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        steps = 200

        def step_thread() -> None:
            for step in range(steps):
                for q in queues:  # one output per request per step, as the engine core sends them
                    box.post(q, EngineOutput("r", step, None, 1, 0, step + 1, 0.0))
                if step % 17 == 0:
                    time.sleep(0.001)  # let the loop run between some steps

        thread = threading.Thread(target=step_thread)
        thread.start()
        got: list[list[int]] = [[] for _ in queues]
        for _ in range(steps):
            for i, q in enumerate(queues):
                out = await asyncio.wait_for(q.get(), 10)
                assert out.token_id is not None
                got[i].append(out.token_id)
        thread.join()
        return got, wakes, steps * len(queues)

    got, wakes, posted = asyncio.run(main())
    assert got == [list(range(200))] * 5
    assert 1 <= wakes < posted


def test_a_closed_loops_mailbox_goes_with_it() -> None:
    loop = asyncio.new_event_loop()
    ref = weakref.ref(loop)
    mailbox(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None
