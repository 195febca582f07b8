"""The v1 operations (``OPERATIONS``), served straight from ASGI: JSON and ``.npy`` codecs over the one pipeline.

``POST /v1/models/{name}[/versions/{version}]/{op}`` is the service's hot path, so it skips FastAPI: on a single-row
request FastAPI's routing, dependency solving, Request and Response objects cost more than parsing the body, and the
model thread waits for the GIL while the event loop spends it. Headers are read once from the scope, the body
straight from ``receive``, and the answer goes out as two ASGI messages. The routes still appear in the OpenAPI
document (``operations_openapi``). The query string is read only when there is one: ``?codes=int8|binary`` on encode,
``?code_version=N`` on decode (which may also be the JSON body's field ``code_version``).
"""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from aeserve.models.columns import MISSING_TEXTS, accepts_missing
from aeserve.models.images import IMAGE_MEDIA_TYPES
from aeserve.models.npy import FLOAT32_MAX
from aeserve.models.outputs import CODE_FORMS, OUTPUTS
from aeserve.service import pipeline
from aeserve.service.api.errors import V1, MethodNotAllowed, openapi_errors
from aeserve.service.api.models import lookup
from aeserve.service.auth import check_api_key
from aeserve.service.codec import (
    JSON,
    MULTIPART,
    NPY,
    body_format,
    image_rows,
    is_image_version,
    json_bytes,
    json_field,
    npy_bytes,
    parse_json_inputs,
    parse_rows,
    parse_streams,
    read_body,
    wants_npy,
)
from aeserve.service.errors import Invalid, NotFound, UnsupportedMedia
from aeserve.service.operations import OPERATIONS, Operation
from aeserve.service.runtime.store import ModelStore
from aeserve.service.tables import TableRows

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

# Compressed streams in JSON: one base64 string per row (standard alphabet, padded).
STREAMS_SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "string", "contentEncoding": "base64",
                                                            "pattern": "^[A-Za-z0-9+/]*={0,2}$"},
                  "description": "one compressed stream per row, base64: a 7-byte header (format, model, version), then the coded code"}
IMPUTED = "imputed"  # table rows in JSON: per row, the columns filled as in training
# code_version: what made the codes sent, as encode's answer names it; codes of another version are refused (409).
CODE_VERSION_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[1-9][0-9]*$"}, {"type": "null"}]}
CODE_VERSION_TEXT = "the version that made the codes, as encode answered it; codes of another version are refused (409)"
CONFLICT = (409, "codes of another version than code_version")
STATUSES = ((400, "malformed body"), (401, "missing or wrong API key"), (404, "unknown model, version or operation"),
            (405, "method not allowed"), (413, "body or row count over the limit"), (415, "unsupported Content-Type"),
            (422, "wrong shape, wrong type or a non-finite number"), (503, "overloaded or still loading"))


def operation_target(path: str) -> tuple[str, str, str] | None:
    """(name, version, op) for ``/v1/models/{name}[/versions/{version}]/{op}``, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v1", "models"]:
        return parts[3], "latest", parts[4]
    if len(parts) == 7 and parts[:3] == ["", "v1", "models"] and parts[4] == "versions":
        return parts[3], parts[5], parts[6]
    return None


async def serve_operation(state: State, scope: Scope, receive: Receive, send: Send, name: str, ref: str, op: str) -> None:
    """Answer one operation request, or raise a ServiceError; ``scope["aeserve"]`` gets model, version and op for metrics and logs."""
    operation = OPERATIONS.get(op)
    if operation is None:
        raise NotFound(f"unknown operation {op!r}; allowed: {', '.join(OPERATIONS)}")
    context = scope["aeserve"] = {"op": op}
    if scope["method"] != "POST":
        raise MethodNotAllowed(f"{scope['method']} is not allowed on an operation; use POST", ("POST",))
    headers = dict(scope["headers"])  # ASGI header names are lower-case bytes
    settings = state.settings
    check_api_key(settings.api_key, _text(headers.get(b"authorization")))
    version = lookup(state.store, name, ref, context)
    codes, code_version = query_options(scope["query_string"]) if scope.get("query_string") else ("float", None)
    sent_as = body_format(_text(headers.get(b"content-type")))
    body = await read_body(receive, _text(headers.get(b"content-length")), settings.max_body_bytes)
    table = TableRows.of(version.manifest)
    call, keys = operation.for_version(table is not None)
    # code_version may be in the query string, in the JSON body, or both: each given must be the version's.
    given = [v for v in (code_version, pipeline.code_version(json_field(body, "code_version")) if sent_as == JSON else None) if v is not None]
    if given and not takes_codes(operation):
        raise Invalid(f"code_version applies to operations that take codes (decode); {op} takes "
                      f"{'compressed streams, which name their version' if operation.takes_streams else 'inputs'}")
    for code_version in given:
        pipeline.check_code_version(version, code_version)
    objects, imputed = False, None
    if operation.uses_streams:
        pipeline.streams_of(version, op)  # refused before reading rows, for a version without an entropy model
        if codes != "float":
            raise Invalid(f"codes={codes} applies to encode; {op} answers {'streams' if operation.answers_streams else 'inputs'}")
    if operation.takes_streams:
        if sent_as != JSON:
            raise UnsupportedMedia(f'decompress takes {JSON}: {{"inputs": ["<base64 stream>", ...]}}, as compress answers')
        array = await run_in_threadpool(pipeline.unpack, version, parse_streams(body))
    elif sent_as not in (JSON, NPY):  # image files (one, or a part each): decoded as the training images were
        array = await run_in_threadpool(image_rows, body, version.manifest, call.takes, _text(headers.get(b"content-type")), settings.max_rows)
    elif table is not None and sent_as == JSON and call.takes == "inputs":  # table rows: arrays in column order, or objects
        array, objects, imputed = table.encode(parse_json_inputs(body), settings.max_rows)
    else:
        array = parse_rows(sent_as, body)
    outputs, sent_shape = await pipeline.run(state.batcher, version, call, array, settings.max_rows, codes=codes)
    if call.takes == "inputs":  # data comes back flat or nested, as it was sent
        outputs = tuple(o.reshape(len(o), *sent_shape) if OUTPUTS[n].mirrors_input else o for n, o in zip(call.outputs, outputs, strict=True))
    if operation.answers_streams:  # entropy coding takes time per row: off the event loop (docs/serving.md)
        outputs = ([base64.b64encode(stream).decode() for stream in await run_in_threadpool(pipeline.pack, version, outputs[0])],)
    if wants_npy(_text(headers.get(b"accept"))) and not operation.answers_streams:  # streams have no .npy form: JSON
        content, media = npy_bytes(outputs[0]), NPY
    else:
        answer: dict[str, Any] = dict(zip(keys, outputs, strict=True))
        if codes != "float":  # what reads the codes: the int8 scale or the binary threshold
            answer.update(version.code_quantization.constants(codes))
        if table is not None:
            for output, key in zip(call.outputs, keys, strict=True):
                if output == "reconstruction":
                    answer[key] = table.decode(answer[key], objects)
                elif output == "feature_error":
                    answer[key] = table.per_column(answer[key], objects)
        if imputed is not None:
            answer[IMPUTED] = imputed
        content, media = json_bytes({"model": name, "version": context["version"], **answer}), JSON
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", media.encode()), (b"content-length", b"%d" % len(content)),
        (b"x-model-name", name.encode()), (b"x-model-version", context["version"].encode())]})
    await send({"type": "http.response.body", "body": content})


def query_options(query: bytes) -> tuple[str, int | None]:
    """The ``codes`` query parameter (float when absent) and ``code_version`` (None when absent), checked; other
    parameters are ignored."""
    parameters = parse_qs(query.decode("latin-1"), keep_blank_values=True)
    codes, code_version = parameters.get("codes"), parameters.get("code_version")
    if codes is not None and len(codes) > 1:
        raise Invalid(f"give codes once, one of {', '.join(CODE_FORMS)}; got {codes}")
    if code_version is not None and len(code_version) > 1:
        raise Invalid(f"give code_version once; got {code_version}")
    return pipeline.code_form(codes[0]) if codes else "float", pipeline.code_version(code_version[0]) if code_version else None


def takes_codes(operation: Operation) -> bool:
    """Whether the operation's rows are codes as encode answers them: the operations that take ``code_version``."""
    return operation.call.takes == "codes" and not operation.takes_streams


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _number(bound: float) -> dict[str, Any]:
    return {"type": "number", "minimum": -bound, "maximum": bound}


def _nested(shape: tuple[int, ...], number: dict[str, Any]) -> dict[str, Any]:
    if not shape:
        return number
    return {"type": "array", "minItems": shape[0], "maxItems": shape[0], "items": _nested(shape[1:], number)}


def _table_column(feature: dict[str, Any], bound: float) -> dict[str, Any]:
    """What a table column takes: a number, one of its categories or a date; and, where the version fills a missing
    field, null or a missing text too (a category's own texts among them stay categories)."""
    if feature["type"] == "category":
        values = list(feature["categories"])
        if accepts_missing(feature):
            values += [text for text in MISSING_TEXTS if text not in values] + [None]
        return {"enum": values}
    value = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}],
             "description": "an ISO 8601 date (YYYY-MM-DD), or a date and time: the date is what counts"} if feature["type"] == "date" else _number(bound)
    if not accepts_missing(feature):
        return value
    return {"anyOf": [value, {"enum": [*MISSING_TEXTS, None]}], "description": "null, or a missing text such as \"NA\", is filled as in training"}


def _table_rows(table: TableRows, bound: float) -> list[dict[str, Any]]:
    """A table version's row forms: values in column order, or an object keyed by column name (which may leave out a
    column the version fills, and carry the table's ignored columns)."""
    columns = [_table_column(feature, bound) for feature in table.features]
    required = [f["name"] for f in table.features if not accepts_missing(f)]
    ignored = {name: {"description": "a column training left out: ignored"} for name in table.ignored}
    return [{"type": "array", "prefixItems": columns, "items": False, "minItems": len(columns), "maxItems": len(columns)},
            {"type": "object", "properties": {**dict(zip(table.names, columns, strict=True)), **ignored}, "required": required,
             "additionalProperties": False}]


def _inputs_schema(shapes: dict[tuple[int, ...], float], tables: list[list[dict]], max_rows: int) -> dict[str, Any]:
    """Rows all of one form: flat or nested in one of ``shapes`` (shape -> largest magnitude admitted), or a table's
    forms; any lists of numbers when nothing is loaded."""
    rows = {"type": "array", "minItems": 1, "maxItems": max_rows,
            "description": "rows: flat lists of numbers, or nested in the model's input_shape (for decode: codes); "
                           "for a table, values in the manifest's column order or objects keyed by column name"}
    forms = [{"type": "array", "minItems": 1, "items": _number(FLOAT32_MAX)}] if not shapes and not tables else []
    for shape, bound in sorted(shapes.items()):
        forms.append(_nested((int(np.prod(shape)),), _number(bound)))
        if len(shape) > 1:
            forms.append(_nested(shape, _number(bound)))
    forms += [form for table in tables for form in table if form not in forms]
    if len(forms) == 1:
        return {**rows, "items": forms[0]}
    return {**rows, "anyOf": [{"items": form} for form in forms]}


def _refs(store: ModelStore, name: str) -> list[str]:
    """What a request may name a loaded version of ``name`` by: its numbers and its aliases."""
    entry = store.entry(name)
    return [*map(str, sorted(entry.versions)), *sorted(entry.aliases)]


def _name_parameter(names: list[str] | None) -> dict[str, Any]:
    return {"name": "name", "in": "path", "required": True, "schema": {"type": "string", **({"enum": names} if names else {})}}


def _version_parameter(refs: list[str] | None) -> dict[str, Any]:
    return {"name": "version", "in": "path", "required": True, "description": "a version number or an alias",
            "schema": {"type": "string", **({"enum": refs} if refs else {})}}


def _at(post: dict[str, Any], path_parameters: list[dict[str, Any]], operation_id: str) -> dict[str, dict]:
    return {"post": {**post, "operationId": operation_id, "parameters": [*path_parameters, *post["parameters"]]}}


def operations_openapi(store: ModelStore, max_rows: int) -> dict[str, dict]:
    """OpenAPI path items for the operations, each admitting exactly the rows of the versions its route reaches.

    A body's schema cannot depend on a path parameter. Where every loaded version takes the same rows, one path item
    per route serves every name (``{name}`` and ``{version}``, enums of the loaded ones); where they differ, each name
    has its own (``/v1/models/NAME/op``), and each version of it too where its versions differ among themselves.
    """
    names = store.names() if store.loaded_once else []  # the names a request uses: the registry's folders
    paths: dict[str, dict] = {}
    for op, operation in OPERATIONS.items():
        reached: dict[tuple[str, str], dict[str, Any]] = {}  # (name, version or alias) -> the operation there
        for name in names:
            for ref in _refs(store, name):
                version = store.get(name, ref)
                if not operation.uses_streams or version.streams is not None:  # compress, decompress: versions of kind rd
                    reached[name, ref] = _post(operation, [version], max_rows)
        if not names and not operation.uses_streams:  # nothing loaded yet: rows of numbers, any name
            post = _post(operation, [], max_rows)
            paths[f"/v1/models/{{name}}/{op}"] = _at(post, [_name_parameter(None)], f"{op}_latest")
            paths[f"/v1/models/{{name}}/versions/{{version}}/{op}"] = _at(post, [_name_parameter(None), _version_parameter(None)],
                                                                           f"{op}_versioned")
        posts = list(reached.values())
        if posts and all(post == posts[0] for post in posts):  # one path item per route serves every name
            latest = sorted({name for name, ref in reached if ref == "latest"})
            if latest:
                paths[f"/v1/models/{{name}}/{op}"] = _at(posts[0], [_name_parameter(latest)], f"{op}_latest")
            paths[f"/v1/models/{{name}}/versions/{{version}}/{op}"] = _at(
                posts[0], [_name_parameter(sorted({name for name, _ in reached})), _version_parameter(sorted({ref for _, ref in reached}))],
                f"{op}_versioned")
            continue
        for name in sorted({name for name, _ in reached}):
            mine = {ref: post for (other, ref), post in reached.items() if other == name}
            if "latest" in mine:
                paths[f"/v1/models/{name}/{op}"] = _at(mine["latest"], [], f"{op}_{name}_latest")
            first = next(iter(mine.values()))
            if all(post == first for post in mine.values()):  # its versions take the same rows
                paths[f"/v1/models/{name}/versions/{{version}}/{op}"] = _at(first, [_version_parameter(sorted(mine))], f"{op}_{name}_versioned")
                continue
            for ref, post in mine.items():
                paths[f"/v1/models/{name}/versions/{ref}/{op}"] = _at(post, [], f"{op}_{name}_{ref}")
    return paths


def _post(operation: Operation, versions: list[ModelVersion], max_rows: int) -> dict[str, Any]:
    """The OpenAPI operation for ``versions`` (none: nothing is loaded), without its path parameters."""
    answers_codes = "code" in operation.call.outputs and not operation.uses_streams
    shapes: dict[tuple[int, ...], float] = {}
    tables = []
    for v in versions:
        table, bound = TableRows.of(v.manifest), pipeline.value_bound(v, operation.call)
        if table is not None and operation.call.takes == "inputs":
            tables.append(_table_rows(table, bound))
            continue
        shape = pipeline.row_shape(v, operation.call)
        shapes[shape] = min(shapes.get(shape, FLOAT32_MAX), bound)
    inputs = STREAMS_SCHEMA if operation.takes_streams else _inputs_schema(shapes, tables, max_rows)
    properties: dict[str, Any] = {"inputs": inputs}
    if takes_codes(operation):
        properties["code_version"] = {**CODE_VERSION_SCHEMA, "description": CODE_VERSION_TEXT + "; or give it in the query string"}
    content = {JSON: {"schema": {"type": "object", "required": ["inputs"], "properties": properties}}}
    if operation.call.takes == "inputs" and any(is_image_version(v.manifest) for v in versions):
        content.update({media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_MEDIA_TYPES})
        content[MULTIPART] = {"schema": {"type": "object", "properties": {"images": {
            "type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files, one a part, in row order"}}}}
    body = {"required": True, "content": content,
            "description": "JSON: compressed streams, as compress answers them" if operation.takes_streams else
                           f"JSON, or one .npy array of shape (n, ...) with Content-Type: {NPY}; to a version trained on images, also "
                           "one image file, or several as multipart/form-data"}
    answer = {"model": {"type": "string"}, "version": {"type": "string"}}
    answer.update({key: {"type": "array"} for key in (*operation.answer_keys, *operation.table_outputs.values())})
    if tables and operation.call.takes == "inputs":
        answer[IMPUTED] = {"type": "array", "items": {"type": "array", "items": {"type": "string"}},
                           "description": "table rows sent as JSON: per row, the columns whose missing value was filled as in training"}
    if operation.answers_streams:
        answer["outputs"] = STREAMS_SCHEMA
    if answers_codes:
        answer.update({key: {"type": "array", "items": {"type": "number"}, "description": f"with codes={form}"}
                       for key, form in (("scale", "int8"), ("threshold", "binary"))})
    answers = {JSON: {"schema": {"type": "object", "required": ["model", "version", *operation.answer_keys], "properties": answer}}}
    if not operation.answers_streams:  # streams are answered in JSON only
        answers[NPY] = {}
    responses = {"200": {"description": f"outputs, with X-Model-Name and X-Model-Version headers; Accept: {NPY} answers the first as .npy",
                         "content": answers}}
    statuses = STATUSES if not takes_codes(operation) else tuple(sorted((*STATUSES, CONFLICT)))
    responses.update({str(status): response for status, response in openapi_errors(V1, statuses).items()})
    forms = list(CODE_FORMS) if any(v.code_quantization is not None for v in versions) else ["float"]
    codes = {"name": "codes", "in": "query", "required": False, "schema": {"type": "string", "enum": forms, "default": "float"},
             "description": "the codes' form: float (float32, the model's own), int8 (the answer's scale: code ~ scale * q) or binary "
                            "(bits code > threshold, 8 per byte, first dimension in the first byte's high bit: rows of "
                            "ceil(code_dim / 8) bytes 0-255); int8 and binary are for versions published with them"}
    code_version = {"name": "code_version", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                    "description": CODE_VERSION_TEXT + "; or give it as the JSON body's code_version"}
    parameters = [codes] if answers_codes else [code_version] if takes_codes(operation) else []
    return {"tags": ["models"], "summary": operation.summary, "parameters": parameters, "requestBody": body,
            "responses": responses}
