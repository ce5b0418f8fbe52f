"""The one error type the engines hand to the API: a kind, a message for the client and the field at fault.

A request that fails inside an engine ends with an event carrying an `EngineError`; a request the engine
refuses up front (full, down, invalid) raises one. `service.api.errors` maps each kind to its HTTP status in
one table; nothing else in the engine knows about HTTP.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    """Why a request failed; the value is the `code` the client sees."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked (retrying will not help)
    OVERLOADED = "queue_full"  # no room now: retry later
    QUEUE_TIMEOUT = "queue_timeout"  # waited longer than the queue timeout before it started
    TIMEOUT = "timeout"  # ran past its time limit
    ENGINE_DEAD = "engine_dead"  # the engine loop is stopped or died
    INTERNAL = "internal_error"  # a failure of ours (the model step, sampling, detokenizing)


class EngineError(Exception):
    """kind: what went wrong; message: for the client; param: the request field at fault, when one is."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.param = param

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.value}: {self.message!r})"


class EngineDeadError(EngineError):
    kind = ErrorKind.ENGINE_DEAD


class EngineOverloadedError(EngineError):
    """The server is at capacity: the caller should retry later."""

    kind = ErrorKind.OVERLOADED


def invalid_request(message: str, param: str | None = None) -> EngineError:
    return EngineError(message, ErrorKind.INVALID_REQUEST, param)


def internal_error(message: str) -> EngineError:
    return EngineError(message, ErrorKind.INTERNAL)


def grammar_limit_error(reason: str) -> EngineError:
    """A request whose grammar stopped at one of the grammar engine's work limits (llguidance's Earley items per
    row or per step, lexer fuel) while computing a token mask: the grammar, not the server, is at fault."""
    return invalid_request(f"constrained decoding stopped: the grammar exceeds the grammar engine's limits ({reason})")
