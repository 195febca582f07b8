"""Request bodies -> validated float32 arrays, and outputs -> JSON or .npy bodies.

JSON: ``{"inputs": [row, ...]}``; a row is a flat list or nested in the
expected shape. Binary: one ``.npy`` array of shape (n, ...). Everything a
client can get wrong ends in a domain error (``service/errors.py``) with a message saying what is allowed.
"""
from __future__ import annotations

import base64
import binascii
import email.policy
import io
import json
import math
from email.parser import BytesParser
from typing import Any

import numpy as np
import orjson
import simdjson
from starlette.types import Receive

from aeserve.models.images import IMAGE_MEDIA_TYPES, ImageTooLarge, open_image, size_and_channels, to_pixels
from aeserve.models.npy import FLOAT32_MAX, read_header
from aeserve.models.registry import is_number
from aeserve.service.errors import Invalid, Malformed, TooLarge, TooManyRows, UnsupportedMedia

NPY = "application/x-npy"
JSON = "application/json"
MULTIPART = "multipart/form-data"
Body = bytes | bytearray  # a request body as read_body returns it
NPY_HEADER_BYTES = 10_012  # magic, version and length (at most 12 bytes), then a header of at most 10,000
# Image bodies are refused by the size their headers declare, before decoding: a small file can declare a huge image
# (docs/api.md, "Images", has the figures).
MAX_IMAGE_PIXELS = 25_000_000  # one image: a 24 MP photo (6000x4000, 5712x4284) passes
MAX_REQUEST_PIXELS = 100_000_000  # all images of one request together: four such photos, or 1,500 of 256x256


async def read_body(receive: Receive, content_length: str | None, limit: int) -> Body:
    """The whole body from ASGI ``receive``, refused (TooLarge) as soon as it is known to exceed ``limit`` bytes.

    With a Content-Length, each chunk is copied once, into a buffer of that size: joining a list of chunks at the end
    would copy everything a second time into fresh memory, mostly page faults (docs/serving.md, "Costs the code is
    shaped by"). A body that comes in one message is that message's bytes, not copied at all.
    """
    if content_length is None:
        return await _read_chunked(receive, limit)
    if not is_number(content_length):
        raise Malformed(f"Content-Length must be a number of bytes, got {content_length!r}")
    expected = int(content_length)
    if expected > limit:
        raise TooLarge(f"request body of {expected} bytes exceeds the limit of {limit} bytes")
    buffer: bytearray | None = None
    size, more = 0, True
    while more:
        chunk, more = await _next_chunk(receive)
        if buffer is None:
            if not more and len(chunk) == expected:
                return chunk
            buffer = bytearray(expected)
        end = size + len(chunk)
        if end > expected:
            raise Malformed(f"the body is longer than its Content-Length of {expected} bytes")
        buffer[size:end] = chunk
        size = end
    if size != expected:
        raise Malformed(f"the body holds {size} bytes but its Content-Length says {expected}")
    return buffer


async def _read_chunked(receive: Receive, limit: int) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        chunk, more = await _next_chunk(receive)
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _next_chunk(receive: Receive) -> tuple[bytes, bool]:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise Malformed("the client closed the connection before sending the whole body")
    return message.get("body", b""), message.get("more_body", False)


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def body_format(content_type: str | None) -> str:
    """What a request body is sent as, by its Content-Type (none means JSON): JSON, NPY, an image media type or
    multipart/form-data; UnsupportedMedia for anything else."""
    sent_as = media_type(content_type)
    if sent_as not in ("", JSON, NPY, MULTIPART, *IMAGE_MEDIA_TYPES):
        images = f", or to a version trained on images one image as {', '.join(IMAGE_MEDIA_TYPES)}" if sent_as.startswith("image/") else ""
        raise UnsupportedMedia(f"unsupported Content-Type {sent_as!r}; send {JSON} or {NPY}{images}")
    return sent_as or JSON


def is_image_version(manifest: dict[str, Any]) -> bool:
    """Whether a version was trained on an image folder, and so takes image bodies."""
    return manifest.get("training", {}).get("data", {}).get("source") == "images"


def image_rows(body: Body, manifest: dict[str, Any], takes: str, content_type: str | None = None,
               max_rows: int | None = None) -> np.ndarray:
    """Image files as rows (n, *input_shape) uint8, brought to the version's size and channels by the rule the training
    data went through (``models/images.py``): the body is one file, or with ``multipart/form-data`` one file a part.
    More than ``max_rows`` parts are refused (TooManyRows) before any is parsed or decoded."""
    if not is_image_version(manifest):
        raise UnsupportedMedia(f"this version takes {JSON} or {NPY}; image bodies are for versions trained on an image folder "
                               "(data.source = 'images')")
    if takes != "inputs":
        raise UnsupportedMedia(f"this operation takes codes, not an image; send {JSON} or {NPY}")
    if media_type(content_type) != MULTIPART:
        return decode_images([bytes(body)], manifest, ["the body"], max_rows)
    files = multipart_files(body, content_type or "", max_rows)
    return decode_images([data for _, data in files], manifest, [name for name, _ in files], max_rows)


def decode_images(files: list[bytes], manifest: dict[str, Any], names: list[str], max_rows: int | None = None,
                  where: str = "") -> np.ndarray:
    """Image files -> rows (n, *input_shape) uint8; none gives (0, *input_shape), refused as no rows by validate_rows.

    TooManyRows before decoding anything for more than ``max_rows`` files; TooLarge before decoding it for a file whose
    header declares more than MAX_IMAGE_PIXELS, or more than are left of MAX_REQUEST_PIXELS; Malformed naming the one
    that is not a readable image. ``where`` starts the row limit's message, as validate_rows's.
    """
    input_shape = tuple(manifest["input_shape"])
    if max_rows is not None and len(files) > max_rows:
        raise TooManyRows(len(files), max_rows, where)
    size, channels = size_and_channels(input_shape)
    rows = np.empty((len(files), *input_shape), np.uint8)
    left = MAX_REQUEST_PIXELS
    for row, (data, name) in enumerate(zip(files, names, strict=True)):
        try:
            image = open_image(data, min(MAX_IMAGE_PIXELS, left))
            rows[row] = to_pixels(image, size, channels)
        except ImageTooLarge as e:
            raise TooLarge(_too_large(name, e, MAX_REQUEST_PIXELS - left, size)) from None
        except (OSError, ValueError, SyntaxError) as e:
            raise Malformed(f"{name} is not a readable image ({e}); send PNG, JPEG, WebP or BMP files") from None
        left -= image.width * image.height
    return rows


def _too_large(name: str, e: ImageTooLarge, before: int, size: tuple[int, int]) -> str:
    takes = f"this version takes {size[1]}x{size[0]} pixels"
    if e.pixels > MAX_IMAGE_PIXELS:
        return f"{name} declares {e.declared}, more than the {MAX_IMAGE_PIXELS / 1e6:g} megapixels an image may have; send it smaller ({takes})"
    return (f"{name} declares {e.declared}, which brings this request's images to {(before + e.pixels) / 1e6:.1f} megapixels, more "
            f"than the {MAX_REQUEST_PIXELS / 1e6:g} megapixels a request may have; send fewer images a request, or smaller ones ({takes})")


def multipart_files(body: Body, content_type: str, max_rows: int | None = None) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/form-data`` body as (how an error names it, bytes), in order. The standard library's
    MIME parser reads them; Malformed when the body is not that. More than ``max_rows`` parts, counted by their
    delimiter lines, are refused (TooManyRows) before the parser reads them, which costs time per part (docs/serving.md)."""
    parser = BytesParser(policy=email.policy.HTTP)
    header = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    boundary = parser.parsebytes(header).get_boundary()
    if max_rows is not None and boundary:
        delimiter = b"--" + boundary.encode("latin-1")
        count = body.count(b"\n" + delimiter) + body.startswith(delimiter) - body.count(delimiter + b"--")
        if count > max_rows:
            raise TooManyRows(count, max_rows)
    message = parser.parsebytes(header + bytes(body))
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts or message.defects:
        raise Malformed("the multipart/form-data body has no parts, or no boundary that separates them; send one image file a part")
    files = []
    for i, part in enumerate(parts, 1):
        label = part.get_filename() or part.get_param("name", header="content-disposition")
        files.append((f"part {i}" + (f" ({label!r})" if label else ""), part.get_payload(decode=True) or b""))
    return files


def wants_npy(accept: str | None) -> bool:
    return accept is not None and NPY in accept


def _parse_json(body: Body) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        # Python's parser also reads NaN and Infinity literals, which are then refused as non-finite (Invalid).
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise Malformed(f"malformed JSON body: {e}") from None


def _plain_rows(body: Body) -> np.ndarray | None:
    """``{"inputs": [[numbers], ...]}`` straight into an array, or None to take the general path.

    simdjson reads the numbers into a buffer without a Python object per number, faster than orjson's parse plus
    numpy's list conversion (docs/serving.md, "Costs the code is shaped by"). It is taken only where it cannot differ
    from the general path: two quotes (the key, nothing else), one bracket per row plus the outer one (rows are flat
    lists), rows of equal length, and only numbers (as_buffer refuses strings, booleans, nulls and objects).
    Everything else (NaN literals, big integers, nested rows) goes the general way.
    """
    if body.count(b'"') != 2:
        return None
    try:
        inputs = simdjson.Parser().parse(body)["inputs"]
        rows = len(inputs)
        if rows == 0 or body.count(b"[") != rows + 1:
            return None
        flat = np.frombuffer(inputs.as_buffer(of_type="d"), dtype=np.float64)
        width = len(flat) // rows
        if len(flat) != rows * width or not all(len(row) == width for row in inputs):
            return None
    except (ValueError, TypeError, KeyError, RuntimeError):
        return None
    return flat.reshape(rows, width)


def parse_json_inputs(body: Body) -> Any:
    """The ``inputs`` of a JSON body ``{"inputs": [row, ...]}``, as parsed."""
    document = _parse_json(body)
    if not isinstance(document, dict) or "inputs" not in document:
        raise Invalid('the JSON body must be an object {"inputs": [row, ...]}')
    return document["inputs"]


def json_field(body: Body, key: str) -> Any:
    """A top-level field of a JSON body other than ``inputs`` (None when absent); the body is parsed once more only
    when the key's name occurs in it."""
    if f'"{key}"'.encode() not in body:
        return None
    document = _parse_json(body)
    return document.get(key) if isinstance(document, dict) else None


def parse_streams(body: Body) -> list[bytes]:
    """``{"inputs": ["<base64>", ...]}`` -> the byte strings; Invalid naming the row that is not base64."""
    inputs = parse_json_inputs(body)
    if not isinstance(inputs, list) or not inputs:
        raise Invalid("inputs must be a non-empty list of compressed streams, each a base64 string as compress answers them")
    streams = []
    for row, value in enumerate(inputs):
        if not isinstance(value, str):
            raise Invalid(f"row {row}: a compressed stream must be a base64 string, got {type(value).__name__}")
        try:
            streams.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise Invalid(f"row {row}: not base64 (standard alphabet, with padding)") from None
    return streams


def _rows_from_json(body: Body) -> np.ndarray:
    plain = _plain_rows(body)
    if plain is not None:
        return plain
    inputs = parse_json_inputs(body)
    if not isinstance(inputs, list):
        raise Invalid(f"inputs must be a list of rows, got {type(inputs).__name__}")
    try:
        array = np.asarray(inputs)
    except (ValueError, OverflowError):
        raise Invalid("inputs are ragged: every row must have the same shape") from None
    if array.dtype.kind == "O":
        for row, values in enumerate(inputs):  # numpy keeps what is not a number of its own as an object: say which row
            if any(v is None for v in _flat(values)):
                raise Invalid(f"row {row} holds null; inputs must be numbers")
            if any(isinstance(v, int) and abs(v) > FLOAT32_MAX for v in _flat(values)):
                raise Invalid(f"row {row} holds a number that overflows float32 (largest allowed magnitude {FLOAT32_MAX:.4g})")
        if any(isinstance(v, int) and not isinstance(v, bool) for v in _flat(inputs)):
            raise Invalid(f"a number in inputs overflows float32 (largest allowed magnitude {FLOAT32_MAX:.4g})")
        raise Invalid("inputs are ragged or mixed: every row must be a list of numbers of the same shape")
    if array.dtype.kind in "USb":
        raise Invalid(f"inputs must be numbers, got {'booleans' if array.dtype.kind == 'b' else 'strings'}")
    # numpy reads [true, 2] as the integers [1, 2]; look for booleans only when the body can hold one.
    if (b"true" in body or b"false" in body) and any(isinstance(v, bool) for v in _flat(inputs)):
        raise Invalid("inputs must be numbers, got booleans")
    return array


def _flat(value: Any):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            yield item


def _rows_from_npy(body: Body) -> np.ndarray:
    """A view of the array inside the body, without copying it."""
    stream = io.BytesIO(body[:NPY_HEADER_BYTES])
    try:
        header = read_header(stream, max_header_size=NPY_HEADER_BYTES - 12)
        if header is None:
            stream.seek(0)
            raise ValueError(f".npy format version {np.lib.format.read_magic(stream)} is not supported; use 1.0 or 2.0 (numpy.save writes 1.0)")
        shape, fortran_order, dtype = header
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise Malformed(f"malformed .npy body: {e}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise Malformed(f"malformed .npy body: the header's shape must be non-negative integers, got {shape!r}")
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise Invalid(f"the .npy array must hold numbers (float or int), got dtype {dtype}")
    count = math.prod(shape)
    if len(body) - stream.tell() != count * dtype.itemsize:
        raise Malformed(f"malformed .npy body: the header says shape {list(shape)} of {dtype} "
                        f"({count * dtype.itemsize} bytes), the body holds {len(body) - stream.tell()}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def parse_rows(sent_as: str, body: Body) -> np.ndarray:
    """A body sent as ``sent_as`` (JSON or NPY, as ``body_format`` tells) as an array of rows, not yet validated."""
    return _rows_from_npy(body) if sent_as == NPY else _rows_from_json(body)


def validate_rows(array: np.ndarray, row_shape: tuple[int, ...], max_rows: int, where: str = "",
                  bound: float = FLOAT32_MAX) -> tuple[np.ndarray, tuple[int, ...]]:
    """Rows as the model takes them: ((n, *row_shape) float32, all finite and within ``bound``; one row's shape as sent).

    The one validator of every protocol. Accepts rows that are flat (prod(row_shape) numbers) or nested in
    row_shape; ``where`` starts each message (say "input 'input': ").
    """
    if array.ndim == 0 or len(array) == 0:
        raise Invalid(f"{where}inputs must hold at least one row")
    if len(array) > max_rows:
        raise TooManyRows(len(array), max_rows, where)
    flat_dim = math.prod(row_shape)
    if array.shape[1:] != row_shape and array.shape[1:] != (flat_dim,):
        allowed = f"{flat_dim} numbers" + (f" or nested shape {list(row_shape)}" if len(row_shape) > 1 else "")
        raise Invalid(f"{where}each row must be {allowed}; got rows of shape {list(array.shape[1:])}")
    with np.errstate(over="ignore", invalid="ignore"):
        rows = array.astype(np.float32, copy=False).reshape(len(array), *row_shape)
    # One pass each for the smallest and the largest value (NaN propagates into both): no temporary arrays on the
    # common path (docs/serving.md, "Costs the code is shaped by"). Values beyond float32 are beyond ``bound``.
    # Compared as Python floats: a float16 scalar against ``bound`` would cast ``bound`` to float16 (infinity) and let
    # an infinity through.
    low, high = float(array.min()), float(array.max())
    if not (-bound <= low and high <= bound):
        finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            raise Invalid(f"{where}row {int(np.argmin(finite))} holds a NaN, an infinity or a value that overflows float32; "
                          "all inputs must be finite")
        within = (np.abs(array) <= bound).reshape(len(array), -1).all(axis=1)  # in the numbers' own precision
        raise Invalid(f"{where}row {int(np.argmin(within))} holds a value beyond ±{bound:.7g}, a million times the range of "
                      "the training data; all inputs must lie within it")
    return rows, array.shape[1:]


def check_finite_outputs(arrays: tuple[np.ndarray, ...]) -> None:
    for array in arrays:
        if not np.isfinite(array).all():
            raise Invalid("the model produced non-finite outputs for these inputs (they are far outside the training range)")


def npy_bytes(array: np.ndarray) -> bytes:
    """An output as a .npy file: float32, or compact codes as they are (int8, or uint8 packed bits)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=None if array.dtype in (np.int8, np.uint8) else np.float32), allow_pickle=False)
    return buffer.getvalue()


def _contiguous(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)  # orjson serialises C-contiguous arrays natively
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_bytes(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, default=_contiguous, option=orjson.OPT_SERIALIZE_NUMPY)
