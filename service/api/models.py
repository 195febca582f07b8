"""Model routes: list, manifests, and the four operations (encode, decode, reconstruct, project)."""
from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from models.checkpoint import ModelVersion
from models.registry import NotFoundError
from service.codec import JSON, NPY, check_finite_outputs, json_bytes, npy_bytes, read_rows, wants_npy
from service.errors import ApiError
from service.store import NotReadyError, valid_name

ERROR = {"content": {"application/json": {"schema": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}}}}
router = APIRouter(prefix="/v1", tags=["models"], responses={
    401: {"description": "missing or wrong API key", **ERROR},
    404: {"description": "unknown model or version", **ERROR},
    503: {"description": "models still loading", **ERROR},
})


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


def lookup(request: Request, name: str, ref: str) -> ModelVersion:
    context = request.scope.setdefault("aeserve", {})
    if not valid_name(name):
        raise ApiError(404, f"unknown model {name!r}: model names are letters, digits, '_', '.', '-'")
    try:
        version = request.app.state.store.get(name, ref)
    except NotFoundError as e:
        raise ApiError(404, str(e.args[0])) from None
    except NotReadyError as e:
        raise ApiError(503, str(e), {"Retry-After": "1"}) from None
    context.update(model=name, version=str(version.version))
    return version


async def run_operation(request: Request, name: str, ref: str, op: str) -> Response:
    request.scope.setdefault("aeserve", {})["op"] = op
    operation = OPERATIONS.get(op)
    if operation is None:
        raise ApiError(404, f"unknown operation {op!r}; allowed: {', '.join(OPERATIONS)}")
    version = lookup(request, name, ref)
    state = request.app.state
    row_shape = (version.code_dim,) if operation.takes_codes else version.input_shape
    rows, sent_shape = await read_rows(request, row_shape, state.settings.max_rows, state.settings.max_body_bytes)
    outputs = await state.batcher.submit(operation.method(version), rows)
    check_finite_outputs(*outputs)
    main = outputs[0].reshape(len(rows), *sent_shape) if operation.mirrors_input else outputs[0]
    headers = {"X-Model-Name": name, "X-Model-Version": str(version.version)}
    if wants_npy(request):
        return Response(npy_bytes(main), media_type=NPY, headers=headers)
    document = {"model": name, "version": str(version.version), "outputs": main, **dict(zip(operation.extras, outputs[1:], strict=True))}
    return Response(json_bytes(document), media_type=JSON, headers=headers)


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


@router.get("/models")
async def list_models(request: Request) -> Response:
    """Names, loaded versions and aliases of every model."""
    store = request.app.state.store
    models = []
    for name in store.names():
        entry = store.entry(name)
        models.append({"name": name, "versions": [str(v) for v in sorted(entry.versions)],
                       "aliases": {a: str(v) for a, v in sorted(entry.aliases.items())}})
    return Response(json_bytes({"models": models}), media_type=JSON)


@router.get("/models/{name}")
async def latest_manifest(request: Request, name: str) -> Response:
    """The manifest of the latest version."""
    version = lookup(request, name, "latest")
    return Response(json_bytes(version.manifest), media_type=JSON, headers={"X-Model-Name": name, "X-Model-Version": str(version.version)})


@router.get("/models/{name}/versions/{version}")
async def version_manifest(request: Request, name: str, version: str) -> Response:
    """The manifest of a version (number or alias)."""
    loaded = lookup(request, name, version)
    return Response(json_bytes(loaded.manifest), media_type=JSON, headers={"X-Model-Name": name, "X-Model-Version": str(loaded.version)})


VERSION_FILE = re.compile(r"^(report/[a-z0-9_-]+\.(md|png)|map/sample\.json)$")
FILE_TYPES = {".md": "text/markdown; charset=utf-8", ".png": "image/png", ".json": "application/json"}


@router.get("/models/{name}/versions/{version}/files/{path:path}", responses={200: {"content": {t: {} for t in FILE_TYPES.values()}}})
async def version_file(request: Request, name: str, version: str, path: str) -> Response:
    """A file published with the version: report/report.md, report/*.png, or map/sample.json (the map explorer's points)."""
    loaded = lookup(request, name, version)
    folder = loaded.folder.resolve() if loaded.folder is not None else None
    target = (folder / path).resolve() if folder is not None and VERSION_FILE.match(path) else None
    if target is None or folder not in target.parents or not target.is_file():
        raise ApiError(404, f"version {name}:{loaded.version} has no file {path!r}; "
                            "published files are report/report.md, report/*.png and map/sample.json")
    return Response(target.read_bytes(), media_type=FILE_TYPES[target.suffix])


@router.post("/reload")
async def reload(request: Request) -> Response:
    """Look for new versions now; answers what was loaded and what was refused."""
    store = request.app.state.store
    added = await asyncio.to_thread(store.refresh)
    return Response(json_bytes({"loaded": added, "refused": store.failed, "serving": [f"{n}:{v}" for n, v in store.loaded()]}),
                    media_type=JSON)
