"""GET /metrics: the Prometheus exposition (text/plain; its errors, 401 when it is not public, are JSON)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from service.api.errors import error_responses
from service.api.state import server_state

router = APIRouter()
_JSON_ERRORS = {
    s: {
        "description": r["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for s, r in error_responses(401, 500).items()
}


@router.get("/metrics", response_class=PlainTextResponse, responses=_JSON_ERRORS)
async def metrics(request: Request) -> Response:
    body, content_type = server_state(request).metrics.exposition()
    return Response(body, media_type=content_type)


# HEAD answers like GET without a body (monitors use it); kept out of the OpenAPI schema
router.add_api_route("/metrics", metrics, methods=["HEAD"], include_in_schema=False)
