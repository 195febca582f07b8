"""The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension.

What Triton, KServe and MLServer clients speak. The input tensor is ``input``
(shape [n, *input_shape] or [n, prod(input_shape)]) or ``code`` ([n,
code_dim], to decode); the requested outputs (``models/outputs.py``: ``code``,
``reconstruction``, ``error``, ``score``, ``percentile``, ``coordinates``) are one call
of the pipeline, so the encoder runs once however many are asked for. Errors
answer ``{"error": "..."}``, with 400 for what the v1 routes answer 422 (``service/api/errors.py``). The request parameter ``codes`` (``int8`` or
``binary``) answers the ``code`` output as INT8, or as UINT8 packed bits, followed by one more output tensor that reads
it: ``code_scale`` or ``code_threshold`` (FP32, [code_dim]); the protocol's parameters hold only single values. With
the input ``code``, the request parameter ``code_version`` names the version that made the codes: another is refused (409).
An image version also takes the input ``input`` as BYTES ``[n]``: image files, decoded as its training images were.
Compression is a BYTES tensor: the output ``stream`` compresses ``input`` (one byte string per row), and the input
``stream`` is decompressed into ``reconstruction``; with the binary extension each element is a 4-byte little-endian
length and its bytes, in JSON a base64 string (the streams are not text).
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

import aeserve
from aeserve.models.outputs import CODE_FORMS, FROM_CODES, OUTPUTS, Call
from aeserve.models.registry import is_number
from aeserve.service import pipeline
from aeserve.service.api.errors import V2, openapi_errors
from aeserve.service.api.health import readiness
from aeserve.service.api.models import request_lookup
from aeserve.service.codec import decode_images, is_image_version, read_body
from aeserve.service.errors import Invalid, Malformed

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], responses=openapi_errors(V2, (
    (400, "bad request"), (401, "missing or wrong API key"), (404, "unknown model or version"),
    (409, "codes of another version than the parameter code_version"), (413, "body or row count over the limit"), (503, "overloaded or still loading"))))
health_router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])  # no API key, like /health/*

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT8": np.int8,
             "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT16": np.uint16}
ANSWER_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int8): "INT8", np.dtype(np.uint8): "UINT8"}
TAKES = {"input": "inputs", "code": "codes", "stream": "streams"}  # input tensor name -> what its rows are
STREAM = "stream"  # compressed streams (BYTES): the output of compress, the input of decompress
# An input tensor. Its rows are its first dimension (at least one; a scalar, shape [], holds none); its values are in ``data``, or
# with the binary extension in the bytes that the parameter ``binary_data_size`` counts.
TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "enum": list(TAKES)},
    "shape": {"type": "array", "minItems": 1, "prefixItems": [{"type": "integer", "minimum": 1}], "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": sorted([*DATATYPES, "BYTES"])},
    "data": {"type": "array", "items": {"type": ["number", "string"]}, "description": "numbers; for BYTES, base64 strings"},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}},
    "anyOf": [{"required": ["data"]}, {"required": ["parameters"], "properties": {"parameters": {"required": ["binary_data_size"]}}}]}
INFER_BODY = {"requestBody": {"required": True, "description": (
    "One input tensor, 'input' (data), 'code' (to decode) or 'stream' (BYTES [n], to decompress), its data's length the "
    "product of its shape; with the binary tensor data extension the JSON header is followed by the tensor's bytes "
    "(Inference-Header-Content-Length). The output 'stream' (BYTES [n]) compresses 'input'."),
    "content": {"application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": [*OUTPUTS, "stream"]}, "parameters": {"type": "object"}}}},
        "parameters": {"type": "object", "properties": {"codes": {
            "type": "string", "enum": list(CODE_FORMS), "default": "float",
            "description": "the code output as FP32, INT8 (then the answer adds the tensor code_scale: code ~ code_scale * q) or "
                           "UINT8 packed bits (code > code_threshold, 8 per byte, first dimension in the first byte's high bit; "
                           "the answer adds code_threshold); INT8 and UINT8 for versions published with them"},
            "code_version": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[1-9][0-9]*$"}, {"type": "null"}],
                             "description": "with the input 'code': the version that made the codes; codes of another version "
                                            "are refused (409)"}}}}}}}}}


def _json(document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _version(request: Request, name: str, version: str) -> ModelVersion:
    request.scope.setdefault("aeserve", {})["op"] = "infer"
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
    ok = readiness(request.app.state) is None
    return _json({"ready": ok}, 200 if ok else 503, None if ok else {"Retry-After": "1"})


def model_metadata(version: ModelVersion) -> dict[str, Any]:
    tensor = lambda name, row: {"name": name, "datatype": "FP32", "shape": [-1, *row]}  # noqa: E731
    streams = [{"name": STREAM, "datatype": "BYTES", "shape": [-1]}] if version.streams is not None else []
    return {
        "name": version.name, "versions": [str(version.version)], "platform": f"aeserve_{version.manifest['kind']}",
        "inputs": [tensor(name, pipeline.row_shape(version, Call(takes, ("code",)))) for name, takes in TAKES.items() if name != STREAM] + streams,
        "outputs": [tensor(name, output.row_shape(version)) for name, output in OUTPUTS.items()] + streams,
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


@router.post("/models/{name}/infer", openapi_extra=INFER_BODY)
async def infer_latest(request: Request, name: str) -> Response:
    """Inference (latest version)."""
    return await infer(request, name, "latest")


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """Inference (a version number or alias)."""
    return await infer(request, name, version)


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    """An object's ``parameters``, or {} when absent or not an object."""
    parameters = item.get("parameters")
    return parameters if isinstance(parameters, dict) else {}


def _input_tensor(spec: Any, binary: memoryview, offset: int, may_hold_booleans: bool = True) -> tuple[str, np.ndarray | list[bytes], int]:
    """(name, array — or byte strings for BYTES —, new offset into the binary part) for one request input.
    ``may_hold_booleans`` is False when the JSON header holds no ``true`` or ``false``: no need to look for booleans."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise Invalid("each input must be an object with a name, shape, datatype and data")
    name, shape, datatype = spec["name"], spec.get("shape"), spec.get("datatype")
    if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != "BYTES"):
        raise Invalid(f"input {name!r}: datatype {datatype!r} is not one of {sorted([*DATATYPES, 'BYTES'])}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise Invalid(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if datatype == "BYTES":
        return _bytes_tensor(spec, name, shape, binary, offset)
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)
    size = _binary_data_size(spec, name)
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise Malformed(f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                            f"({count * dtype.itemsize} bytes) or the bytes sent")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<"))
        offset += size
    else:
        array = _numbers(spec.get("data"), name, datatype, may_hold_booleans)
        if array.size != count:
            raise Invalid(f"input {name!r}: shape {shape} needs {count} values, data has {array.size}")
    try:
        return name, array.reshape(shape), offset
    except ValueError:  # a 0 in the shape lets the others be beyond what an array can have
        raise Invalid(f"input {name!r}: shape {shape} has more dimensions, or larger ones, than an array can have") from None


def _binary_data_size(spec: dict[str, Any], name: str) -> int | None:
    """An input's ``binary_data_size`` parameter: None when absent, else a byte count (a non-negative integer)."""
    size = _parameters(spec).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise Invalid(f"input {name!r}: binary_data_size must be a non-negative integer (a byte count), got {size!r}")
    return size


def _json_kind(value: Any) -> str:
    """What a JSON value is, for error messages."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return {type(None): "null", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _numbers(data: Any, name: str, datatype: str, may_hold_booleans: bool) -> np.ndarray:
    """JSON ``data`` (a flat list of numbers, or lists nested as the shape) as an array of ``datatype``, shaped as sent.

    Refuses what a cast with ``np.asarray(data, dtype)`` lets through: strings (it parses them), booleans, and for
    integer datatypes fractions (it truncates them) and values outside the datatype's range; errors name the element,
    counted row-major. One conversion without a dtype tells what kind all the values are, with no Python loop over
    them; only an error's message looks at them one by one.
    """
    if not isinstance(data, list):
        raise Invalid(f"input {name!r}: data must be a list of numbers of datatype {datatype}, got {_json_kind(data)}")
    try:
        values = np.asarray(data)
    except ValueError:
        raise Invalid(f"input {name!r}: data is ragged or nested too deep: send one flat list, or lists of equal lengths "
                      "nested as the shape") from None
    # numpy reads [true, 2] as the integers [1, 2]; look for booleans only when the header can hold one.
    if values.dtype.kind not in "iuf" or (may_hold_booleans and bool in set(map(type, np.asarray(data, dtype=object).flat))):
        for index, value in enumerate(np.asarray(data, dtype=object).flat):
            if type(value) not in (int, float):
                raise Invalid(f"input {name!r}: data must be numbers of datatype {datatype}; element {index} is {_json_kind(value)}")
        values = np.asarray(data, dtype=np.float64)  # numbers only, which numpy could not hold as one kind
    dtype = np.dtype(DATATYPES[datatype])
    with np.errstate(invalid="ignore", over="ignore"):  # a float outside an integer type's range casts to garbage, refused below
        array = values.astype(dtype)
    if dtype.kind in "iu":
        changed = np.flatnonzero(array != values)
        if changed.size:
            index = int(changed[0])
            value = values.flat[index].item()
            if value != math.trunc(value):
                raise Invalid(f"input {name!r}: data element {index}, {value!r}, is not an integer, as {datatype} needs")
            info = np.iinfo(dtype)
            raise Invalid(f"input {name!r}: data element {index}, {value!r}, is outside {datatype}'s range [{info.min}, {info.max}]")
    return array


def _bytes_tensor(spec: dict[str, Any], name: str, shape: list[int], binary: memoryview, offset: int) -> tuple[str, list[bytes], int]:
    """A BYTES tensor of shape [n]: with the binary extension, each element a 4-byte little-endian length and its bytes;
    in JSON, each element a base64 string (compressed streams are not text)."""
    if len(shape) != 1:
        raise Invalid(f"input {name!r}: a BYTES tensor has shape [n], one byte string per row; got {shape}")
    size = _binary_data_size(spec, name)
    if size is None:
        data = spec.get("data")
        if not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(v, str) for v in data):
            raise Invalid(f"input {name!r}: data must be {shape[0]} base64 strings")
        try:
            return name, [base64.b64decode(v, validate=True) for v in data], offset
        except (binascii.Error, ValueError):
            raise Invalid(f"input {name!r}: data must be base64 strings (standard alphabet, padded)") from None
    if offset + size > len(binary):
        raise Malformed(f"input {name!r}: binary_data_size {size} is more than the {len(binary) - offset} bytes sent")
    chunk, items, at = bytes(binary[offset:offset + size]), [], 0
    while at < len(chunk):
        length = int.from_bytes(chunk[at:at + 4], "little")
        if at + 4 > len(chunk) or at + 4 + length > len(chunk):
            raise Malformed(f"input {name!r}: element {len(items)}'s length runs past binary_data_size")
        items.append(chunk[at + 4:at + 4 + length])
        at += 4 + length
    if len(items) != shape[0]:
        raise Malformed(f"input {name!r}: shape {shape} needs {shape[0]} byte strings, the bytes hold {len(items)}")
    return name, items, offset + size


def _call(input_name: str, document: dict[str, Any]) -> tuple[Call, list[dict[str, Any]]]:
    """The call a request asks for, and its requested outputs (all that its input can answer when it names none)."""
    if input_name not in TAKES:
        raise Invalid(f"unknown input {input_name!r}; use 'input' (data), 'code' (to decode) or 'stream' (to decompress)")
    takes = TAKES[input_name]
    defaults = FROM_CODES if takes in ("codes", "streams") else [name for name, output in OUTPUTS.items() if output.by_default]
    requested = document.get("outputs") or [{"name": n} for n in defaults]
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise Invalid("outputs must be a list of objects with a name")
    unknown = [o["name"] for o in requested if o["name"] not in OUTPUTS and o["name"] != STREAM]
    if unknown:
        raise Invalid(f"unknown output(s) {unknown}; allowed: {[*OUTPUTS, STREAM]}")
    if not isinstance(_parameters(document).get("binary_data_output", False), bool):
        raise Invalid(f"the request parameter binary_data_output must be true or false, got {_parameters(document)['binary_data_output']!r}")
    for output in requested:
        if not isinstance(_parameters(output).get("binary_data", False), bool):
            raise Invalid(f"output {output['name']!r}: binary_data must be true or false, got {_parameters(output)['binary_data']!r}")
    if any(o["name"] == STREAM for o in requested):  # compress: the codes, coded
        if takes != "inputs" or len(requested) != 1:
            raise Invalid(f"output {STREAM!r} (compress) comes alone, from the input tensor 'input'")
        return Call("inputs", ("code",)), requested
    takes = "codes" if takes == "streams" else takes  # decompress: streams are decoded into codes first
    try:
        call = Call(takes, tuple(dict.fromkeys(o["name"] for o in requested))).check()
    except ValueError as e:
        raise Invalid(f"input {input_name!r}: {e}") from None
    return call, requested


async def infer(request: Request, name: str, version_ref: str) -> Response:
    version = _version(request, name, version_ref)
    settings = request.app.state.settings
    body = await read_body(request.receive, request.headers.get("content-length"), settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is not None and (not is_number(header_length) or int(header_length) > len(body)):
        raise Malformed(f"{HEADER_LENGTH} must be a byte count within the body, got {header_length!r}")
    split = int(header_length) if header_length is not None else len(body)
    try:
        document = orjson.loads(body[:split])
    except orjson.JSONDecodeError as e:
        raise Malformed(f"malformed JSON inference header: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or len(document["inputs"]) != 1:
        raise Invalid("the request must hold exactly one input tensor, named 'input' (data) or 'code' (to decode)")
    may_hold_booleans = body.find(b"true", 0, split) >= 0 or body.find(b"false", 0, split) >= 0
    input_name, array, end = _input_tensor(document["inputs"][0], memoryview(body)[split:], 0, may_hold_booleans)
    if split + end != len(body):
        raise Malformed(f"input {input_name!r}: {len(body) - split - end} bytes follow the tensor's data; binary_data_size must "
                        f"count every byte after the JSON header ({HEADER_LENGTH} {split})")
    call, requested = _call(input_name, document)
    compress = requested[0]["name"] == STREAM
    codes = pipeline.code_form(_parameters(document).get("codes", "float"))
    code_version = pipeline.code_version(_parameters(document).get("code_version"))
    if code_version is not None:
        if input_name != "code":
            raise Invalid(f"the code_version parameter applies to the input 'code' (codes to decode); got input {input_name!r}")
        pipeline.check_code_version(version, code_version)
    if (compress or input_name == STREAM) and codes != "float":
        raise Invalid(f"the codes parameter applies to the 'code' output; got codes={codes} with compressed streams")
    if input_name == STREAM:
        if not isinstance(array, list):
            raise Invalid(f"input {STREAM!r} must be a BYTES tensor: the streams compress made")
        array = await run_in_threadpool(pipeline.unpack, version, array)
    elif isinstance(array, list):  # BYTES as 'input': image files, for a version trained on images
        if input_name != "input" or not is_image_version(version.manifest):
            raise Invalid(f"input {input_name!r} takes numbers; BYTES are image files (input 'input' of a version trained on "
                          "images) or compressed streams (input 'stream')")
        array = await run_in_threadpool(decode_images, array, version.manifest, [f"element {i} of input 'input'" for i in range(len(array))],
                                        settings.max_rows, "input 'input': ")
    if compress:
        pipeline.streams_of(version, "compress")
    outputs, _ = await pipeline.run(request.app.state.batcher, version, call, array, settings.max_rows, f"input {input_name!r}: ", codes)
    if compress:
        return _answer(document, name, version, requested, {STREAM: await run_in_threadpool(pipeline.pack, version, outputs[0])})
    results = dict(zip(call.outputs, outputs, strict=True))
    constants = version.code_quantization.constants(codes) if codes != "float" else {}
    results.update({f"code_{key}": value for key, value in constants.items()})
    requested = [*requested, *({"name": f"code_{key}"} for key in constants)]
    return _answer(document, name, version, requested, results)


def _answer(document: dict[str, Any], name: str, version: ModelVersion, requested: list[dict[str, Any]],
            results: dict[str, np.ndarray | list[bytes]]) -> Response:
    """The inference response: each requested output as JSON data, or after the JSON header with the binary extension."""
    binary_default = _parameters(document).get("binary_data_output", False)  # booleans, as _call checked
    answers, chunks = [], []
    for spec in requested:
        array = results[spec["name"]]
        binary = _parameters(spec).get("binary_data", binary_default)
        if isinstance(array, list):  # BYTES: compressed streams
            entry: dict[str, Any] = {"name": spec["name"], "datatype": "BYTES", "shape": [len(array)]}
            if binary:
                data = b"".join(len(item).to_bytes(4, "little") + item for item in array)
                entry["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                entry["data"] = [base64.b64encode(item).decode() for item in array]
            answers.append(entry)
            continue
        array = np.ascontiguousarray(array, dtype=array.dtype if array.dtype in ANSWER_DATATYPES else np.float32)
        entry = {"name": spec["name"], "datatype": ANSWER_DATATYPES[array.dtype], "shape": list(array.shape)}
        if binary:
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel()
        answers.append(entry)
    answer = {"model_name": name, "model_version": str(version.version), "outputs": answers}
    if "id" in document:
        answer["id"] = document["id"]
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
