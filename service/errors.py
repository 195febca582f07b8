"""Client errors as JSON ``{"detail": ...}`` with the right status; never a 500 for what a client sent."""
from __future__ import annotations

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> Response:
    """``{"detail": ...}``, or the Open Inference Protocol's ``{"error": ...}`` under /v2/."""
    key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
    return Response(orjson.dumps({key: detail}), status_code=status, media_type="application/json", headers=headers)


def overloaded(inflight: int, path: str) -> Response:
    """503 for a request refused before it starts."""
    return error_response(503, f"overloaded: {inflight} requests are in progress; retry shortly", {"Retry-After": "1"}, path)


async def api_error_handler(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.detail, exc.headers, request.url.path)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', '')}"
    return error_response(exc.status_code, detail, getattr(exc, "headers", None), request.url.path)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(422, problems, path=request.url.path)
