"""What crosses the wire: the ``.npy`` request body, the answer as a Result, error answers as exceptions."""
from __future__ import annotations

import base64
import email.utils
import io
import json
import math
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import numpy as np

from aeserve_client.errors import error_for

NPY = "application/x-npy"
PIECE_BYTES = 1 << 18


@dataclass
class Result:
    # float32: codes (n, code_dim), data (n, *input_shape) or coordinates (n, 2). Lists: compress's streams, and a table
    # version's rows (numbers and category names) as the server wrote them.
    outputs: np.ndarray | list
    model: str
    version: str
    errors: np.ndarray | None = None  # reconstruct only: (n,) summed squared errors
    percentiles: np.ndarray | None = None  # reconstruct only: (n,) where each score falls among the held-out rows' scores, 0-100
    scores: np.ndarray | None = None  # reconstruct only: (n,) the version's anomaly score per row (its errors, for a version without one)


@dataclass
class Neighbors:
    """The stored items nearest each row sent, nearest first, from the server's index of the version's codes."""

    ids: list  # per row, k ids as the codes file holds them (numbers, or texts)
    distances: np.ndarray  # (n, k) float32: Euclidean for float and int8 codes, differing bits for binary codes
    model: str
    version: str
    metric: str  # l2 | hamming


def path(name: str, op: str, version: str | int | None, code_version: int | None = None) -> str:
    route = f"/v1/models/{name}/{op}" if version is None else f"/v1/models/{name}/versions/{version}/{op}"
    return route if code_version is None else f"{route}?code_version={int(code_version)}"


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    """Integers of one or two bytes (pixels, say) and float16 cross as they are, and the server widens them to float32
    exactly: a batch of uint8 images is a quarter of its float32 size. Everything else crosses as float32, which is
    what the model computes in."""
    if (dtype.kind in "iu" and dtype.itemsize <= 2) or dtype == np.float16:
        return dtype
    return np.dtype(np.float32)


class NpyBody:
    """A ``.npy`` body as its header, then slices of the array's own memory: nothing is copied before the socket.

    Saving the array into a buffer copies it, and httpx joins a ``bytes`` body
    with its framing into one more fresh copy; for a large batch those copies
    are a visible share of the call. Each 256 KB piece is copied once by the
    HTTP layer, while it is still in cache. The object can be iterated again,
    so a request can be sent again (retries).
    """

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype.kind == "c":  # float32 would keep the real part and drop the rest with only a warning
            raise TypeError(f"the model takes real numbers; got an array of {array.dtype}")
        array = np.ascontiguousarray(array, dtype=_wire_dtype(array.dtype))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
        self.header = header.getvalue()
        self.data = memoryview(array.reshape(-1).view(np.uint8))

    def __len__(self) -> int:
        return len(self.header) + len(self.data)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield self.header
        for start in range(0, len(self.data), PIECE_BYTES):
            yield self.data[start:start + PIECE_BYTES]


async def async_pieces(body: NpyBody) -> AsyncIterator[bytes | memoryview]:
    for piece in body:
        yield piece


def npy_request(op: str, array: np.ndarray) -> tuple[NpyBody, dict[str, str]]:
    """The body and headers of one operation on ``array`` (n, ...)."""
    # reconstruct answers errors, scores and percentiles too, which only the JSON answer carries; compress answers streams (JSON).
    accept = "application/json" if op in ("reconstruct", "compress") else NPY
    body = NpyBody(array)
    return body, {"Content-Type": NPY, "Accept": accept, "Content-Length": str(len(body))}


def streams_request(streams: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a decompress request: the streams as base64 strings in JSON, the rows back as .npy."""
    body = json.dumps({"inputs": [base64.b64encode(bytes(s)).decode() for s in streams]}).encode()
    return body, {"Content-Type": "application/json", "Accept": NPY}


def stream_version(stream: bytes) -> int | None:
    """The version a stream names in its header (format 0xA1: byte 0, 3 bytes of the model, then the version as
    LEB128), or None when it is not such a stream (the server then says what is wrong)."""
    if len(stream) < 5 or stream[0] != 0xA1:
        return None
    version, shift = 0, 0
    for byte in stream[4:14]:
        version |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return version
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date (RFC 9110, 10.2.3); None when absent or
    unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def max_rows(value: str | None) -> int | None:
    """``X-Max-Rows``, the most rows the server takes in one request, as a whole number >= 1; None when absent or
    unreadable."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value) or None


ROW = re.compile(r"^row (\d+)\b")  # how a refusal that names a row starts


def neighbors_request(inputs: np.ndarray | None, codes: np.ndarray | None, k: int,
                      code_version: int | None) -> tuple[NpyBody | bytes, dict[str, str], str]:
    """The body, headers and query string of a neighbors request: inputs as .npy, or codes (in the index's form) in JSON."""
    if (inputs is None) == (codes is None):
        raise ValueError("give inputs (rows the version encodes) or codes (in the index's form), not both")
    if inputs is not None:
        if code_version is not None:
            raise ValueError("code_version goes with codes; inputs are encoded by the version asked")
        body = NpyBody(inputs)
        return body, {"Content-Type": NPY, "Accept": "application/json", "Content-Length": str(len(body))}, f"?k={int(k)}"
    document = {"codes": np.asarray(codes).tolist(), "k": int(k), "code_version": None if code_version is None else int(code_version)}
    return json.dumps(document).encode(), {"Content-Type": "application/json"}, ""


def neighbors_result(response: httpx.Response, first_row: int = 0) -> Neighbors:
    check(response, first_row)
    body = response.json()
    return Neighbors(body["ids"], np.asarray(body["distances"], dtype=np.float32).reshape(len(body["ids"]), -1), body["model"],
                     body["version"], body["metric"])


def join_neighbors(parts: list[Neighbors]) -> Neighbors:
    """The answers to the slices of one neighbors call, as one."""
    if len(parts) == 1:
        return parts[0]
    return Neighbors([ids for part in parts for ids in part.ids], np.concatenate([part.distances for part in parts]), parts[0].model,
                     parts[0].version, parts[0].metric)


def check(response: httpx.Response, first_row: int = 0) -> None:
    """Raise the matching AeserveError subclass for an error answer. ``first_row``: where the rows sent start in the
    caller's array (a slice of it), so that a refusal names the row by its place in the whole array."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
        detail = str(body.get("detail", response.text) if isinstance(body, dict) else response.text)
    except ValueError:
        detail = response.text
    if first_row:
        detail = ROW.sub(lambda m: f"row {int(m[1]) + first_row}", detail, count=1)
    raise error_for(response.status_code, detail, retry_after_seconds(response.headers.get("Retry-After")))


def result(response: httpx.Response, first_row: int = 0) -> Result:
    check(response, first_row)
    model, version = response.headers.get("X-Model-Name", ""), response.headers.get("X-Model-Version", "")
    if response.headers.get("content-type", "").startswith(NPY):
        return Result(np.load(io.BytesIO(response.content), allow_pickle=False), model, version)
    body = response.json()
    optional = {k: np.asarray(body[k], dtype=np.float32) for k in ("errors", "percentiles", "scores") if k in body}
    outputs = body["outputs"]
    if outputs and isinstance(outputs[0], str):  # compress: one base64 stream per row
        return Result([base64.b64decode(s) for s in outputs], body["model"], body["version"])
    try:
        outputs = np.asarray(outputs, dtype=np.float32)
    except (TypeError, ValueError):  # a table version's rows: numbers and category names, kept as they are
        pass
    return Result(outputs, body["model"], body["version"], **optional)


def join(parts: list[Result]) -> Result:
    """The answers to consecutive row slices as one answer, rows in order."""
    if len(parts) == 1:
        return parts[0]

    def joined(field: str) -> np.ndarray | None:
        values = [getattr(part, field) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    first = parts[0]
    if isinstance(first.outputs, list):  # streams, or a table's rows: kept as they are
        outputs = [row for part in parts for row in part.outputs]
    else:
        outputs = np.concatenate([part.outputs for part in parts])
    return Result(outputs, first.model, first.version, joined("errors"), joined("percentiles"), joined("scores"))
