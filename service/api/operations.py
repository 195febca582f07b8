"""The four operations (encode, decode, reconstruct, project), served straight from ASGI.

``POST /v1/models/{name}[/versions/{version}]/{op}`` is the service's hot
path, so it skips FastAPI: on a single-row request FastAPI's routing,
dependency solving, Request and Response objects cost more than parsing the
body, and the model thread waits for the GIL while the event loop spends it.
Headers are read once from the scope, the body straight from ``receive``, and
the answer goes out as two ASGI messages. The routes still appear in the
OpenAPI schema (``operations_openapi``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from aeserve.models.checkpoint import ModelVersion
from aeserve.service.api.models import lookup
from aeserve.service.auth import check_api_key
from aeserve.service.codec import JSON, NPY, body_kind, check_finite_outputs, decode_rows, json_bytes, npy_bytes, read_body, wants_npy
from aeserve.service.errors import ApiError
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send


@dataclass(frozen=True)
class Operation:
    name: str
    summary: str
    takes_codes: bool  # input rows are codes (code_dim,) instead of data (input_shape)
    method: Callable[[ModelVersion], Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, ...]]]
    extras: tuple[str, ...] = ()  # names of the outputs after the main one, in the JSON answer
    mirrors_input: bool = False  # the main output has the shape of one input row, flat or nested as sent


OPERATIONS = {op.name: op for op in (
    Operation("encode", "Inputs -> codes (n, code_dim).", False, lambda v: v.encode),
    Operation("decode", "Codes -> inputs (n, *input_shape).", True, lambda v: v.decode),
    Operation("reconstruct", "Inputs -> reconstructions, with summed squared errors and their held-out percentiles.",
              False, lambda v: v.reconstruct, ("errors", "percentiles"), mirrors_input=True),
    Operation("project", "Inputs -> 2-D map coordinates (n, 2).", False, lambda v: v.project),
)}

REQUEST_BODY = {"requestBody": {"required": True, "content": {
    JSON: {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "inputs": {"type": "array", "minItems": 1, "items": {"type": "array", "items": {}},
                   "description": "rows: flat lists of numbers, or nested in the model's input_shape (for decode: codes)"}}}},
    NPY: {"schema": {"type": "string", "format": "binary"}},
}}}
RESPONSES = {
    200: {"content": {JSON: {"schema": {"type": "object", "required": ["model", "version", "outputs"], "properties": {
        "model": {"type": "string"}, "version": {"type": "string"}, "outputs": {"type": "array"},
        "errors": {"type": "array", "items": {"type": "number"}},
        "percentiles": {"type": "array", "items": {"type": "number"}}}}}, NPY: {}},
        "description": "outputs, with X-Model-Name and X-Model-Version headers"},
    **{status: {"description": text} for status, text in (
        (400, "malformed body"), (401, "missing or wrong API key"), (404, "unknown model, version or operation"),
        (413, "body or row count over the limit"), (415, "unsupported Content-Type"),
        (422, "wrong shape, wrong type or a non-finite number"), (503, "overloaded or still loading"))},
}


def operation_target(path: str) -> tuple[str, str, str] | None:
    """(name, version, op) for ``/v1/models/{name}[/versions/{version}]/{op}``, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v1", "models"]:
        return parts[3], "latest", parts[4]
    if len(parts) == 7 and parts[:3] == ["", "v1", "models"] and parts[4] == "versions":
        return parts[3], parts[5], parts[6]
    return None


def operations_openapi() -> dict[str, dict]:
    """OpenAPI path items for the operations, which the operation lane serves outside FastAPI's router."""
    paths: dict[str, dict] = {}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "a version number or an alias"}
    for op, operation in OPERATIONS.items():
        for path, parameters, suffix in ((f"/v1/models/{{name}}/{op}", [name], "latest"),
                                         (f"/v1/models/{{name}}/versions/{{version}}/{op}", [name, version], "versioned")):
            responses = {str(status): dict(answer) for status, answer in RESPONSES.items()}
            paths[path] = {"post": {"tags": ["models"], "summary": operation.summary, "operationId": f"{op}_{suffix}",
                                    "parameters": parameters, **REQUEST_BODY, "responses": responses}}
    return paths


async def serve_operation(state: State, scope: Scope, receive: Receive, send: Send, name: str, ref: str, op: str) -> None:
    """Answer one operation request, or raise ApiError; ``scope["aeserve"]`` gets model, version and op for metrics and logs."""
    context = scope["aeserve"] = {"op": op}
    headers = dict(scope["headers"])  # ASGI header names are lower-case bytes
    settings = state.settings
    check_api_key(settings.api_key, _text(headers.get(b"authorization")))
    operation = OPERATIONS.get(op)
    if operation is None:
        raise ApiError(404, f"unknown operation {op!r}; allowed: {', '.join(OPERATIONS)}")
    version = lookup(state.store, name, ref, context)
    kind = body_kind(_text(headers.get(b"content-type")))
    body = await read_body(receive, _text(headers.get(b"content-length")), settings.max_body_bytes)
    rows, sent_shape = decode_rows(kind, body, (version.code_dim,) if operation.takes_codes else version.input_shape, settings.max_rows)
    outputs = await state.batcher.submit(operation.method(version), rows)
    check_finite_outputs(*outputs)
    main = outputs[0].reshape(len(rows), *sent_shape) if operation.mirrors_input else outputs[0]
    if wants_npy(_text(headers.get(b"accept"))):
        content, media = npy_bytes(main), NPY
    else:
        document = {"model": name, "version": context["version"], "outputs": main, **dict(zip(operation.extras, outputs[1:], strict=True))}
        content, media = json_bytes(document), JSON
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", media.encode()), (b"content-length", b"%d" % len(content)),
        (b"x-model-name", name.encode()), (b"x-model-version", context["version"].encode())]})
    await send({"type": "http.response.body", "body": content})


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
