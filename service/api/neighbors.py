"""``POST /v1/models/{name}[/versions/{version}]/neighbors``: the k nearest stored items, from the version's index.

The rows are ``inputs`` (JSON, ``.npy`` or image files, as encode takes them: the version encodes them first) or, in
JSON, ``codes`` in the index's form with an optional ``code_version`` (codes of another version are refused, 409, as
decode refuses them). ``k`` (default 10, at most ``MAX_K``) is the JSON body's field or the query parameter. The
answer is JSON: per row, the ids of the nearest stored items, nearest first, and their distances.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.types import Receive, Send

from aeserve.models.index import MAX_K, METRICS
from aeserve.service import pipeline
from aeserve.service.api import v1
from aeserve.service.api.errors import V1, openapi_errors
from aeserve.service.codec import JSON, NPY, body_format, image_rows, json_bytes, json_field, parse_json_inputs, parse_rows, read_body
from aeserve.service.errors import Invalid
from aeserve.service.indexes import DEFAULT_K, Indexes, neighbor_count, sent_codes
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime.store import ModelStore
from aeserve.service.tables import TableRows

if TYPE_CHECKING:  # the slim server has no torch; ModelVersion is only named here
    from aeserve.models.version import ModelVersion

NEIGHBORS = "neighbors"
STATUSES = ((400, "malformed body"), (401, "missing or wrong API key"), (404, "unknown model or version, or no index of its codes"),
            (409, "codes of another version than code_version"), (413, "body or row count over the limit"),
            (415, "unsupported Content-Type"), (422, "wrong shape, wrong type, a non-finite number or a bad k"),
            (503, "overloaded or still loading"))


def _agreed(name: str, values: list[Any]) -> Any:
    """The one value given for ``name`` in the query string and the JSON body (None when neither has it)."""
    given = [v for v in values if v is not None]
    if len(set(map(repr, given))) > 1:
        raise Invalid(f"{name} is given twice, differently: {given[0]!r} in the query string, {given[1]!r} in the body")
    return given[0] if given else None


async def serve_neighbors(state: State, scope: dict, receive: Receive, send: Send, version: ModelVersion, headers: dict[bytes, bytes]) -> None:
    """Answer one neighbors request for ``version``, or raise a ServiceError."""
    settings, indexes = state.settings, state.indexes
    index = indexes.find(version)  # 404 before the body is read
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if any(len(values) > 1 for values in query.values()):
        raise Invalid(f"give each query parameter once; got {query}")
    content_type = _text(headers.get(b"content-type"))
    sent_as = body_format(content_type)
    body = await read_body(receive, _text(headers.get(b"content-length")), settings.max_body_bytes)
    in_json = sent_as == JSON
    k = neighbor_count(_agreed("k", [query.get("k", [None])[0], json_field(body, "k") if in_json else None]))
    code_version = pipeline.code_version(_agreed("code_version", [
        query.get("code_version", [None])[0], json_field(body, "code_version") if in_json else None]))
    codes = json_field(body, "codes") if in_json else None
    if codes is not None:
        if json_field(body, "inputs") is not None:
            raise Invalid('give "inputs" (rows the version encodes) or "codes" (codes in the index\'s form), not both')
        if code_version is not None:
            pipeline.check_code_version(version, code_version)
        try:
            array = np.asarray(codes, dtype=np.float64)
        except (ValueError, TypeError):
            raise Invalid("codes must be a list of rows of numbers, all of one length") from None
        queries, form = sent_codes(index, array, settings.max_rows), index.info.codes
    else:
        if code_version is not None:
            raise Invalid('code_version applies to "codes"; inputs are encoded by the version asked')
        table = TableRows.of(version.manifest)
        if sent_as not in (JSON, NPY):
            array = await run_in_threadpool(image_rows, body, version.manifest, "inputs", content_type, settings.max_rows)
        elif table is not None and in_json:
            array = table.encode(parse_json_inputs(body), settings.max_rows)[0]
        else:
            array = parse_rows(sent_as, body)
        (queries,), _ = await pipeline.run(state.batcher, version, OPERATIONS[NEIGHBORS].call, array, settings.max_rows)
        form = "float"
    ids, distances = await run_in_threadpool(index.search, queries, form, k)
    content = json_bytes({"model": version.name, "version": str(version.version), "ids": ids, "distances": distances,
                          "metric": index.info.metric, "codes": index.info.codes})
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", JSON.encode()), (b"content-length", b"%d" % len(content)),
        (b"x-model-name", version.name.encode()), (b"x-model-version", str(version.version).encode())]})
    await send({"type": "http.response.body", "body": content})


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _codes_schema(version: ModelVersion, form: str, max_rows: int) -> dict[str, Any]:
    width = -(-version.code_dim // 8) if form == "binary" else version.code_dim
    value = ({"type": "integer", "minimum": -127, "maximum": 127} if form == "int8" else {"type": "integer", "minimum": 0, "maximum": 255}
             if form == "binary" else {"type": "number", "minimum": -pipeline.VALUE_RANGE, "maximum": pipeline.VALUE_RANGE})
    return {"type": "array", "minItems": 1, "maxItems": max_rows, "description": f"{form} codes, as encode?codes={form} answers them",
            "items": {"type": "array", "minItems": width, "maxItems": width, "items": value}}


def neighbors_openapi(store: ModelStore, indexes: Indexes, max_rows: int) -> dict[str, dict]:
    """OpenAPI path items for neighbors, one per loaded version with an index (and its name's, where latest has one);
    the rows are encode's for that version, or codes in the index's form."""
    paths: dict[str, dict] = {}
    for name, number in sorted(indexes.by_version) if store.loaded_once else []:
        try:
            version = store.get(name, str(number))
        except Exception:  # noqa: BLE001  (not loaded: nothing to document)
            continue
        form = indexes.by_version[name, number].info.codes
        encode = v1.operation_post(OPERATIONS["encode"], [version], max_rows)
        body = {**encode["requestBody"]}
        inputs = body["content"][JSON]["schema"]["properties"]["inputs"]
        k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K, "description": "how many neighbours each row gets"}
        properties = {"inputs": inputs, "codes": _codes_schema(version, form, max_rows), "k": k,
                      "code_version": {**v1.CODE_VERSION_SCHEMA, "description": "with codes: the version that made them (409 if another)"}}
        body["content"] = {**body["content"], JSON: {"schema": {"type": "object", "properties": properties,
                                                                "oneOf": [{"required": ["inputs"]}, {"required": ["codes"]}]}}}
        answer = {"type": "object", "required": ["model", "version", "ids", "distances", "metric", "codes"], "properties": {
            "model": {"type": "string"}, "version": {"type": "string"},
            "ids": {"type": "array", "items": {"type": "array"}, "description": "per row, the k nearest stored items' ids, nearest first"},
            "distances": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                          "description": "per row, their distances: Euclidean for float and int8 codes, differing bits for binary"},
            "metric": {"type": "string", "enum": sorted(set(METRICS.values()))}, "codes": {"type": "string"}}}
        post = {"tags": ["models"], "summary": OPERATIONS[NEIGHBORS].summary, "operationId": f"neighbors_{name}_{number}",
                "parameters": [{"name": "k", "in": "query", "required": False, "schema": k}], "requestBody": body,
                "responses": {"200": {"description": "ids and distances", "content": {JSON: {"schema": answer}}},
                              **{str(s): r for s, r in openapi_errors(V1, STATUSES).items()}}}
        paths[f"/v1/models/{name}/versions/{number}/{NEIGHBORS}"] = {"post": post}
        if store.get(name, "latest").version == number:
            paths[f"/v1/models/{name}/{NEIGHBORS}"] = {"post": {**post, "operationId": f"neighbors_{name}_latest"}}
    return paths

