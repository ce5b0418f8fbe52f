"""Server-sent events: `data: {json}\\n\\n` chunks, ending with `data: [DONE]` (completions, chat, G2P); the
Responses API's name each event (`event: <type>` before its data) and send no [DONE]."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_response(chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    h = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=h)
