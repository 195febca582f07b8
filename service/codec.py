"""Request bodies -> validated float32 arrays, and outputs -> JSON or .npy bodies.

JSON: ``{"inputs": [row, ...]}``; a row is a flat list or nested in the
expected shape. Binary: one ``.npy`` array of shape (n, ...). Everything a
client can get wrong ends in an ApiError with a message saying what is allowed.
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import orjson
from fastapi import Request

from service.errors import ApiError

NPY = "application/x-npy"
JSON = "application/json"
FLOAT32_MAX = float(np.finfo(np.float32).max)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        # Python's parser also reads NaN and Infinity literals, which are then refused as non-finite (422).
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None


def _rows_from_json(body: bytes) -> np.ndarray:
    document = _parse_json(body)
    if not isinstance(document, dict) or "inputs" not in document:
        raise ApiError(422, 'the JSON body must be an object {"inputs": [row, ...]}')
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        raise ApiError(422, f"inputs must be a list of rows, got {type(inputs).__name__}")
    try:
        array = np.asarray(inputs)
    except (ValueError, OverflowError):
        raise ApiError(422, "inputs are ragged: every row must have the same shape") from None
    if array.dtype.kind == "O":
        if any(isinstance(v, int) and not isinstance(v, bool) for v in _flat(inputs)):
            raise ApiError(422, f"a number in inputs overflows float32 (largest allowed magnitude {FLOAT32_MAX:.4g})")
        raise ApiError(422, "inputs are ragged or mixed: every row must be a list of numbers of the same shape")
    if array.dtype.kind in "USb":
        raise ApiError(422, f"inputs must be numbers, got {'booleans' if array.dtype.kind == 'b' else 'strings'}")
    return array


def _flat(value: Any):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            yield item


def _rows_from_npy(body: bytes) -> np.ndarray:
    """A view of the array inside the body, without copying it (read-only)."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version} is not supported; use 1.0 or 2.0 (numpy.save writes 1.0)")
        shape, fortran_order, dtype = read_header(stream, max_header_size=10_000)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ApiError(400, f"malformed .npy body: {e}") from None
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise ApiError(422, f"the .npy array must hold numbers (float or int), got dtype {dtype}")
    count = math.prod(shape)
    if len(body) - stream.tell() != count * dtype.itemsize:
        raise ApiError(400, f"malformed .npy body: the header says shape {list(shape)} of {dtype} "
                            f"({count * dtype.itemsize} bytes), the body holds {len(body) - stream.tell()}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


async def read_rows(request: Request, row_shape: tuple[int, ...], max_rows: int, max_body: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Decode a request into ((n, *row_shape) float32, all finite; the shape of one row as the client sent it).

    Accepts rows that are flat (prod(row_shape) numbers) or nested in row_shape.
    """
    kind = media_type(request.headers.get("content-type"))
    if kind not in ("", JSON, NPY):
        raise ApiError(415, f"unsupported Content-Type {kind!r}; send {JSON} or {NPY}")
    body = await read_body(request, max_body)
    array = _rows_from_npy(body) if kind == NPY else _rows_from_json(body)
    if array.ndim == 0 or len(array) == 0:
        raise ApiError(422, "inputs must hold at least one row")
    if len(array) > max_rows:
        raise ApiError(413, f"{len(array)} rows exceed the limit of {max_rows} rows per request")
    flat_dim = math.prod(row_shape)
    if array.shape[1:] != row_shape and array.shape[1:] != (flat_dim,):
        allowed = f"{flat_dim} numbers" + (f" or nested shape {list(row_shape)}" if len(row_shape) > 1 else "")
        raise ApiError(422, f"each row must be {allowed}; got rows of shape {list(array.shape[1:])}")
    with np.errstate(over="ignore", invalid="ignore"):
        rows = array.astype(np.float32, copy=False).reshape(len(array), *row_shape)
    finite = np.isfinite(rows)
    if not finite.all():
        bad_row = int(np.argmin(finite.reshape(len(rows), -1).all(axis=1)))
        raise ApiError(422, f"row {bad_row} holds a NaN, an infinity or a value that overflows float32; all inputs must be finite")
    return rows, array.shape[1:]


def check_finite_outputs(*arrays: np.ndarray) -> None:
    for array in arrays:
        if not np.isfinite(array).all():
            raise ApiError(422, "the model produced non-finite outputs for these inputs (they are far outside the training range)")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _contiguous(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)  # orjson serialises C-contiguous arrays natively
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_bytes(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, default=_contiguous, option=orjson.OPT_SERIALIZE_NUMPY)
