"""The one request pipeline: every protocol is a codec around ``run``.

A codec (v1 JSON, v1 ``.npy``, the Open Inference Protocol) turns a body into an array of rows and names the call
(``models/outputs.py``); ``run`` validates the rows once, makes one batched model call that computes every output
asked for, and checks the outputs; the codec encodes the answer.
"""
from __future__ import annotations

import numpy as np

from aeserve.models.checkpoint import ModelVersion
from aeserve.models.outputs import Call
from aeserve.service.codec import check_finite_outputs, validate_rows
from aeserve.service.runtime.batcher import Batcher

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


async def run(batcher: Batcher, version: ModelVersion, call: Call, array: np.ndarray, max_rows: int,
              where: str = "") -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """(the call's outputs in its order, one row's shape as sent) for ``array`` (n, ...) as a codec parsed it."""
    rows, sent_shape = validate_rows(array, row_shape(version, call), max_rows, where, value_bound(version, call))
    outputs = await batcher.submit(version, call, rows)
    check_finite_outputs(outputs)
    return outputs, sent_shape
