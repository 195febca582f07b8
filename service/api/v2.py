"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension.

What Triton, KServe and MLServer clients speak. The input tensor is ``input``
(FP32, shape [n, *input_shape] or [n, prod(input_shape)]) or ``code`` ([n,
code_dim], to decode); the requested outputs choose the work: ``code``,
``reconstruction``, ``error`` and ``percentile``, ``coordinates``. Errors
answer ``{"error": "..."}``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from aeserve.models.checkpoint import ModelVersion
from aeserve.service.api.models import request_lookup
from aeserve.service.codec import read_body
from aeserve.service.errors import ApiError
from fastapi import APIRouter, Request
from starlette.responses import Response

import aeserve

ERROR = {"content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], responses={
    status: {"description": text, **ERROR} for status, text in (
        (400, "bad request"), (401, "missing or wrong API key"), (404, "unknown model or version"),
        (413, "body or row count over the limit"), (503, "overloaded or still loading"))})
health_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])  # no API key, like /health/*

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT8": np.int8,
             "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT16": np.uint16}
DATA_OUTPUTS = ("code", "reconstruction", "error", "percentile", "coordinates")


def _json(document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _version(request: Request, name: str, version: str) -> ModelVersion:
    request.scope.setdefault("aeserve", {})["op"] = "v2"
    return request_lookup(request, name, version)


@router.get("")
async def server_metadata() -> Response:
    """Server metadata."""
    return _json({"name": "aeserve", "version": aeserve.__version__, "extensions": ["binary_tensor_data"]})


@health_router.get("/health/live")
async def live() -> Response:
    """200 while the process runs."""
    return _json({"live": True})


@health_router.get("/health/ready", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> Response:
    """200 when models are loaded and the server is not draining."""
    state = request.app.state
    ok = bool(state.store.loaded_once and state.store.names() and not state.draining)
    return _json({"ready": ok}, 200 if ok else 503)


def model_metadata(version: ModelVersion) -> dict[str, Any]:
    shape = [-1, *version.input_shape]
    tensor = lambda name, dims: {"name": name, "datatype": "FP32", "shape": dims}  # noqa: E731
    return {
        "name": version.name,
        "versions": [str(version.version)],
        "platform": f"aeserve_{version.manifest['kind']}",
        "inputs": [tensor("input", shape), tensor("code", [-1, version.code_dim])],
        "outputs": [tensor("code", [-1, version.code_dim]), tensor("reconstruction", shape), tensor("error", [-1]),
                    tensor("percentile", [-1]), tensor("coordinates", [-1, 2])],
    }


async def _metadata(request: Request, name: str, version: str) -> Response:
    return _json(model_metadata(_version(request, name, version)))


async def _model_ready(request: Request, name: str, version: str) -> Response:
    _version(request, name, version)
    return _json({"name": name, "ready": True})


@router.get("/models/{name}")
async def metadata_latest(request: Request, name: str) -> Response:
    """Model metadata (latest version)."""
    return await _metadata(request, name, "latest")


@router.get("/models/{name}/versions/{version}")
async def metadata_version(request: Request, name: str, version: str) -> Response:
    """Model metadata (a version number or alias)."""
    return await _metadata(request, name, version)


@router.get("/models/{name}/ready")
async def ready_latest(request: Request, name: str) -> Response:
    """200 when the model is loaded."""
    return await _model_ready(request, name, "latest")


@router.get("/models/{name}/versions/{version}/ready")
async def ready_version(request: Request, name: str, version: str) -> Response:
    """200 when that version is loaded."""
    return await _model_ready(request, name, version)


@router.post("/models/{name}/infer")
async def infer_latest(request: Request, name: str) -> Response:
    """Inference (latest version)."""
    return await infer(request, name, "latest")


@router.post("/models/{name}/versions/{version}/infer")
async def infer_version(request: Request, name: str, version: str) -> Response:
    """Inference (a version number or alias)."""
    return await infer(request, name, version)


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    """An object's ``parameters``, or {} when absent or not an object."""
    parameters = item.get("parameters")
    return parameters if isinstance(parameters, dict) else {}


def _input_tensor(spec: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """(name, array, new offset into the binary part) for one request input."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(400, "each input must be an object with a name, shape, datatype and data")
    name, shape, datatype = spec["name"], spec.get("shape"), spec.get("datatype")
    if datatype not in DATATYPES:
        raise ApiError(400, f"input {name!r}: datatype {datatype!r} is not one of {sorted(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ApiError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)
    size = _parameters(spec).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise ApiError(400, f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                                f"({count * dtype.itemsize} bytes) or the bytes sent")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<"))
        offset += size
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            raise ApiError(400, f"input {name!r}: data must be numbers of datatype {datatype}") from None
        if array.size != count:
            raise ApiError(400, f"input {name!r}: shape {shape} needs {count} values, data has {array.size}")
    return name, array.reshape(shape), offset


def _rows(version: ModelVersion, name: str, array: np.ndarray) -> np.ndarray:
    row_shape = (version.code_dim,) if name == "code" else tuple(version.input_shape)
    flat = math.prod(row_shape)
    if array.ndim < 1 or (array.shape[1:] != row_shape and array.shape[1:] != (flat,)):
        raise ApiError(400, f"input {name!r}: shape must be [n, {', '.join(map(str, row_shape))}] or [n, {flat}], got {list(array.shape)}")
    if len(array) == 0:
        raise ApiError(400, f"input {name!r} holds no rows")
    if len(array) > 0 and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ApiError(400, f"input {name!r} holds NaN or infinite values; all inputs must be finite")
    with np.errstate(over="ignore"):
        rows = array.astype(np.float32).reshape(len(array), *row_shape)
    if not np.isfinite(rows).all():
        raise ApiError(400, f"input {name!r} holds values that overflow FP32")
    return rows


async def _compute(request: Request, version: ModelVersion, input_name: str, rows: np.ndarray, wanted: list[str]) -> dict[str, np.ndarray]:
    batcher = request.app.state.batcher
    if input_name == "code":
        if wanted != ["reconstruction"]:
            raise ApiError(400, f"from input 'code' the only output is 'reconstruction' (decoded data); asked for {wanted}")
        (decoded,) = await batcher.submit(version.decode, rows)
        return {"reconstruction": decoded}
    results: dict[str, np.ndarray] = {}
    if "code" in wanted:
        (results["code"],) = await batcher.submit(version.encode, rows)
    if {"reconstruction", "error", "percentile"} & set(wanted):
        results["reconstruction"], results["error"], results["percentile"] = await batcher.submit(version.reconstruct, rows)
    if "coordinates" in wanted:
        (results["coordinates"],) = await batcher.submit(version.project, rows)
    return results


async def infer(request: Request, name: str, version_ref: str) -> Response:
    version = _version(request, name, version_ref)
    settings = request.app.state.settings
    body = await read_body(request.receive, request.headers.get("content-length"), settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None and (not header_length.isdigit() or int(header_length) > len(body)):
        raise ApiError(400, f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}")
    split = int(header_length) if header_length is not None else len(body)
    try:
        document = orjson.loads(body[:split])
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON inference header: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or len(document["inputs"]) != 1:
        raise ApiError(400, "the request must hold exactly one input tensor, named 'input' (data) or 'code' (to decode)")
    input_name, array, _ = _input_tensor(document["inputs"][0], memoryview(body)[split:], 0)
    if input_name not in ("input", "code"):
        raise ApiError(400, f"unknown input {input_name!r}; use 'input' (data) or 'code' (to decode)")
    rows = _rows(version, input_name, array)
    if len(rows) > settings.max_rows:
        raise ApiError(413, f"{len(rows)} rows exceed the limit of {settings.max_rows} rows per request")
    requested = document.get("outputs") or [{"name": n} for n in (("reconstruction",) if input_name == "code" else DATA_OUTPUTS)]
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise ApiError(400, "outputs must be a list of objects with a name")
    unknown = [o["name"] for o in requested if o["name"] not in DATA_OUTPUTS]
    if unknown:
        raise ApiError(400, f"unknown output(s) {unknown}; allowed: {list(DATA_OUTPUTS)}")
    results = await _compute(request, version, input_name, rows, [o["name"] for o in requested])
    binary_default = bool(_parameters(document).get("binary_data_output", False))
    outputs, chunks = [], []
    for spec in requested:
        array = np.ascontiguousarray(results[spec["name"]], dtype=np.float32)
        if not np.isfinite(array).all():
            return _json({"error": "the model produced non-finite outputs for these inputs"}, 400)
        entry: dict[str, Any] = {"name": spec["name"], "datatype": "FP32", "shape": list(array.shape)}
        if _parameters(spec).get("binary_data", binary_default):
            data = array.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel()
        outputs.append(entry)
    answer = {"model_name": name, "model_version": str(version.version), "outputs": outputs}
    if "id" in document:
        answer["id"] = document["id"]
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
