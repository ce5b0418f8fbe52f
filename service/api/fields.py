"""Request fields the schemas do not declare: an OpenAI field this server cannot honour is a 400 naming it
(never accepted and dropped); any other unknown field is accepted and logged once, as vLLM does, so that
clients adding their own vendor fields keep working."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from service.api.errors import APIError

log = logging.getLogger("service.api")

# OpenAI request fields this server does not implement, with the values that ask for nothing it lacks
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
    "store": (None, False),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "service_tier": (None, "auto", "default"),
    "previous_response_id": (None,),
    "conversation": (None,),
    "background": (None, False),
    "prompt": (None,),  # the Responses API's stored prompt templates (a completions prompt is declared)
}
_MAX_LOGGED = 1024
_logged: set[str] = set()


def check_extra_fields(body: BaseModel, endpoint: str) -> None:
    for name, value in (body.model_extra or {}).items():
        allowed = UNSUPPORTED.get(name)
        if allowed is not None and value not in allowed:
            raise APIError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        key = f"{endpoint}:{name}"
        if key not in _logged and len(_logged) < _MAX_LOGGED:
            _logged.add(key)
            log.info("ignoring unknown request field %r on %s", name, endpoint)
