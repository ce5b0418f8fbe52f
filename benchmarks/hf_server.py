"""A plain Hugging Face transformers baseline behind a minimal OpenAI-compatible streaming server.

One request at a time (a lock), `model.generate` on a worker thread, tokens streamed as they come.
It is the "what you get without a serving engine" point in the benchmarks, nothing more.

    python -m benchmarks.hf_server --port 8002 [--model PATH.gguf] [--dtype auto] [--threads 2]

Supports `max_tokens`, `temperature` (0: greedy), `top_p`, `ignore_eos` (via `min_new_tokens`),
`stream` with `stream_options.include_usage`, on /v1/completions and /v1/chat/completions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from benchmarks.default_model import default_gguf

log = logging.getLogger("benchmarks.hf_server")


class _TokenStreamer(BaseStreamer):
    """Forwards each generated token id from the generate() thread to an asyncio queue (None: finished)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self._loop, self._queue, self._seen_prompt = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt
            self._seen_prompt = True
            return
        for t in value.reshape(-1).tolist():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, int(t))

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)


class _StopFlag(StoppingCriteria):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)  # type: ignore[return-value]


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively: the CPU has AVX-512 BF16 (Linux's flag) and torch's oneDNN
    says it supports bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return "avx512_bf16" in flags and check is not None and bool(check())


def select_dtype(name: str) -> torch.dtype:
    """auto: bfloat16 where oneDNN computes it natively on this CPU, else float32 (plain transformers on
    torch: no native kernels of ours are involved)."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(dtypes)}")
    return dtypes[name]


def create_app(model: Any, tokenizer: Any, name: str) -> FastAPI:
    app = FastAPI(title="HF transformers baseline")
    lock = asyncio.Lock()
    eos = tokenizer.eos_token_id
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    async def generate(ids: list[int], body: dict[str, Any]) -> AsyncIterator[tuple[str, int]]:
        """Yield (new text, tokens so far) per generated token; holds the lock throughout."""
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "pad_token_id": eos}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=float(body.get("top_p") or 1.0))
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = max_tokens
        async with lock:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[int | None] = asyncio.Queue()
            stop = threading.Event()
            inputs = torch.tensor([ids], dtype=torch.long)

            def work() -> None:
                try:
                    with torch.inference_mode():
                        model.generate(
                            inputs,
                            attention_mask=torch.ones_like(inputs),
                            streamer=_TokenStreamer(loop, queue),
                            stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                            **kw,
                        )
                except Exception:
                    log.exception("generate failed")
                    loop.call_soon_threadsafe(queue.put_nowait, None)

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            out: list[int] = []
            sent = ""
            try:
                while (tok := await queue.get()) is not None:
                    out.append(tok)
                    text = tokenizer.decode(out, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                        yield "", len(out)
                        continue
                    delta, sent = text[len(sent) :], text
                    yield delta, len(out)
            finally:
                stop.set()
                await asyncio.to_thread(worker.join)

    async def respond(ids: list[int], body: dict[str, Any], chat: bool) -> Any:
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": name,
        }

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        max_tokens = int(body.get("max_tokens") or 16)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events() -> AsyncIterator[bytes]:
                n = 0
                async for delta, k in generate(ids, body):
                    n = k
                    if delta:
                        yield _sse({**head, "choices": [choice(delta, None)]})
                yield _sse({**head, "choices": [choice("", "length" if n >= max_tokens else "stop")]})
                if include_usage:
                    yield _sse(
                        {
                            **head,
                            "choices": [],
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
                        }
                    )
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, n = "", 0
        async for delta, k in generate(ids, body):
            text, n = text + delta, k
        finish = "length" if n >= max_tokens else "stop"
        msg = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [msg],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": name, "object": "model", "owned_by": "hf-baseline", "dtype": dtype, "kernels": "torch"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return JSONResponse(
                {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}}, status_code=400
            )
        return await respond(tokenizer(prompt, add_special_tokens=True)["input_ids"], body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await request.json()
        ids = tokenizer.apply_chat_template(body.get("messages") or [], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return await respond(list(ids), body, chat=True)

    return app


def load(path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model and tokenizer from a GGUF file (dequantized to `dtype`) or a Hugging Face directory."""
    if os.path.isfile(path):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tok


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hf_server", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--model", default=None, help="GGUF file or HF directory; default: the SmolLM2 GGUF")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 where oneDNN runs it natively on this CPU, else float32",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.model or default_gguf()
    dtype = select_dtype(a.dtype)
    t0 = time.perf_counter()
    model, tok = load(path, dtype)
    name = a.served_model_name or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    log.info(
        "loaded %s (%s) in %.1f s; serving as %r with %d threads",
        path,
        dtype,
        time.perf_counter() - t0,
        name,
        torch.get_num_threads(),
    )
    uvicorn.run(create_app(model, tok, name), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
