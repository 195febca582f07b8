"""Errors over HTTP: each protocol's status for each domain error (``service/errors.py``), in one table, and its body.

v1 answers ``{"detail": "..."}``, the Open Inference Protocol under /v2 ``{"error": "..."}``. Never a 500 for anything
a client sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from aeserve.service.errors import (
    Conflict,
    Invalid,
    Malformed,
    NeedsFullInstall,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TooLarge,
    TooManyRows,
    Unauthenticated,
    Unavailable,
    UnsupportedMedia,
)


class MethodNotAllowed(ServiceError):
    """A method the route does not take; ``allow``: those it does."""

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


@dataclass(frozen=True)
class Protocol:
    name: str
    key: str  # the error body's one field
    column: int  # its column in STATUSES


V1 = Protocol("v1", "detail", 0)
V2 = Protocol("v2", "error", 1)  # the Open Inference Protocol, under /v2

# The status of each domain error, per protocol. The Open Inference Protocol has no 422: what v1 refuses as invalid,
# it refuses as a bad request.
STATUSES: dict[type[ServiceError], tuple[int, int]] = {
    #                   v1   v2
    Malformed:        (400, 400),
    Unauthenticated:  (401, 401),
    NotFound:         (404, 404),
    MethodNotAllowed: (405, 405),
    Conflict:         (409, 409),
    TooLarge:         (413, 413),
    UnsupportedMedia: (415, 415),
    Invalid:          (422, 400),
    NeedsFullInstall: (503, 503),
    NotReady:         (503, 503),
    Overloaded:       (503, 503),
}


def protocol_of(path: str) -> Protocol:
    return V2 if path == "/v2" or path.startswith("/v2/") else V1


def status_of(error: ServiceError, protocol: Protocol) -> int:
    listed = next(cls for cls in type(error).__mro__ if cls in STATUSES)  # the error's class, or the nearest listed base
    return STATUSES[listed][protocol.column]


def headers_of(error: ServiceError) -> dict[str, str]:
    """What a client acts on, as headers: when to retry, how to authenticate, which methods, the row limit."""
    if isinstance(error, Unavailable):
        return {"Retry-After": str(error.retry_after)}
    if isinstance(error, Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(error, MethodNotAllowed):
        return {"Allow": ", ".join(error.allow)}
    if isinstance(error, TooManyRows):
        return {"X-Max-Rows": str(error.limit)}
    return {}


def error_body(protocol: Protocol, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({protocol.key: message}), status_code=status, media_type="application/json", headers=headers)


def answer(error: ServiceError, protocol: Protocol) -> Response:
    """The HTTP answer to a domain error under ``protocol``."""
    return error_body(protocol, status_of(error, protocol), error.message, headers_of(error))


def internal_error(protocol: Protocol) -> Response:
    return error_body(protocol, 500, "internal error; the server log has the details")


def openapi_errors(protocol: Protocol, statuses: tuple[tuple[int, str], ...]) -> dict[int, dict[str, Any]]:
    """OpenAPI responses for (status, description) pairs, each with the protocol's error body."""
    schema = {"type": "object", "required": [protocol.key], "properties": {protocol.key: {"type": "string"}}}
    return {status: {"description": text, "content": {"application/json": {"schema": schema}}} for status, text in statuses}


async def service_error_handler(request: Request, exc: ServiceError) -> Response:
    return answer(exc, protocol_of(request.url.path))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', '')}"
    return error_body(protocol_of(request.url.path), exc.status_code, detail, getattr(exc, "headers", None))


async def validation_error_handler(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return answer(Invalid(problems), protocol_of(request.url.path))
