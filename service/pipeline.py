"""The one request pipeline: every protocol is a codec around ``run``.

A codec (v1 JSON, v1 ``.npy``, the Open Inference Protocol) turns a body into an array of rows and names the call
(``models/outputs.py``); ``run`` validates the rows once, makes one batched model call that computes every output
asked for, and checks the outputs; the codec encodes the answer. A request may ask for its codes in a compact form
(``codes``: int8 or binary, ``models/outputs.py``): the model call is the same, and the float codes are made compact
after it, so requests in any form batch together.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from aeserve.models.outputs import CODE_FORMS, Call
from aeserve.models.streams import StreamError, StreamFormat
from aeserve.service.codec import check_finite_outputs, validate_rows
from aeserve.service.errors import Conflict, Invalid
from aeserve.service.runtime.batcher import Batcher

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

# Input values are taken within a million times the training data's range (codes: within a million), where every
# kind answers finite outputs; the OpenAPI document states the same bound.
VALUE_RANGE = 1e6


def row_shape(version: ModelVersion, call: Call) -> tuple[int, ...]:
    """The shape of one row of the call's input."""
    return (version.code_dim,) if call.takes == "codes" else tuple(version.input_shape)


def value_bound(version: ModelVersion, call: Call) -> float:
    """The largest magnitude taken in the call's input rows."""
    if call.takes == "codes":
        return VALUE_RANGE
    return version.preprocessing.magnitude_bound(VALUE_RANGE)


def code_form(value: object) -> str:
    """A request's ``codes`` option as sent, checked: one of CODE_FORMS (Invalid naming them otherwise)."""
    if value not in CODE_FORMS:
        raise Invalid(f"codes must be one of {', '.join(CODE_FORMS)}; got {value!r}")
    return value


VERSION_NUMBER = re.compile(r"[1-9][0-9]*")


def code_version(value: object) -> int | None:
    """A request's ``code_version`` as sent (a version number, or its digits as text), checked; None when absent (or null)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1 and float(value).is_integer():
        return int(value)  # JSON's 3.0 is the integer 3, as JSON Schema reads it
    if isinstance(value, str) and VERSION_NUMBER.fullmatch(value):
        return int(value)
    raise Invalid(f"code_version must be a version number (1, 2, 3, ...); got {value!r}")


def check_code_version(version: ModelVersion, code_version: int | None) -> None:
    """Conflict when codes made by version ``code_version`` are sent to another version of the same name: each
    version's codes mean something else, and decoding them with another would answer without a word of warning."""
    if code_version is not None and code_version != version.version:
        raise Conflict(f"the codes are of {version.name} version {code_version}, this is version {version.version}: their codes differ; "
                       f"decode them with version {code_version}, or encode the data again with version {version.version}")


def check_codes(version: ModelVersion, call: Call, codes: str) -> None:
    """Invalid when the call cannot answer its codes as ``codes``: no code output, or a version without compact codes."""
    if codes == "float":
        return
    if "code" not in call.outputs:
        raise Invalid(f"codes={codes} applies to the codes that encode answers; this call answers {', '.join(call.outputs)}")
    if version.code_quantization is None:
        raise Invalid(f"version {version.name}:{version.version} has no code quantization (it was published before int8 and "
                      f"binary codes); retrain it to get {codes} codes, or ask for codes=float")


async def run(batcher: Batcher, version: ModelVersion, call: Call, array: np.ndarray, max_rows: int,
              where: str = "", codes: str = "float") -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """(the call's outputs in its order, one row's shape as sent) for ``array`` (n, ...) as a codec parsed it; the
    ``code`` output in the form ``codes`` (float32, int8, or packed bits as uint8)."""
    check_codes(version, call, codes)
    rows, sent_shape = validate_rows(array, row_shape(version, call), max_rows, where, value_bound(version, call))
    outputs = await batcher.submit(version, call, rows)
    check_finite_outputs(outputs)
    if codes != "float":
        outputs = tuple(version.code_quantization.compact(o, codes) if n == "code" else o for n, o in zip(call.outputs, outputs, strict=True))
    return outputs, sent_shape


def streams_of(version: ModelVersion, op: str) -> StreamFormat:
    """The version's stream format; Invalid for a version without an entropy model."""
    if version.streams is None:
        raise Invalid(f"version {version.name}:{version.version} (kind {version.manifest.get('kind')}) has no entropy model, so it cannot "
                      f"{op}; compress and decompress need a version of kind rd (configs/fmnist-rd-1.toml, say)")
    return version.streams


def pack(version: ModelVersion, codes: np.ndarray) -> list[bytes]:
    """Codes (n, code_dim) as encode answers them -> one stream per row."""
    streams = streams_of(version, "compress")
    return [streams.pack(row) for row in codes]


def unpack(version: ModelVersion, streams: list[bytes]) -> np.ndarray:
    """Streams -> their codes (n, code_dim) float32; Invalid naming the row of one this version cannot decode."""
    formats = streams_of(version, "decompress")
    try:
        codes = [formats.unpack(stream, row) for row, stream in enumerate(streams)]
    except StreamError as e:
        raise Invalid(str(e)) from None
    return np.stack(codes) if codes else np.zeros((0, version.code_dim), np.float32)
