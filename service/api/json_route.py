"""A route class that parses large JSON bodies on a worker thread: a multi-megabyte prompt must not hold
the event loop (health probes, other streams) while `json.loads` runs. FastAPI reads the body with
`request.json()`, so the route hands it a request whose `json()` does that work off the loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

OFF_LOOP_ABOVE = 64 * 1024  # bytes; smaller bodies parse faster than a thread hand-off


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = (
                    await asyncio.to_thread(json.loads, body) if len(body) > OFF_LOOP_ABOVE else json.loads(body)
                )
            except RecursionError:  # FastAPI would answer a bare "There was an error parsing the body"
                raise HTTPException(400, "the JSON body is nested too deeply to parse") from None
        return self._json


class OffLoopJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return handle
