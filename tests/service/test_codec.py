"""Request bodies to rows: the simdjson lane for plain numeric rows agrees with the general path, or steps aside."""
import json

import numpy as np
import orjson
import pytest

from service.codec import JSON, _plain_rows, decode_rows
from service.errors import ApiError


def general(body: bytes) -> np.ndarray:
    """What the general path (orjson, then numpy's list conversion) makes of a body."""
    return np.asarray(orjson.loads(body)["inputs"], dtype=np.float64)


@pytest.mark.parametrize("rows", [
    [[0.0, 1.5, 255.0]],
    [[1, 2, 3], [4, 5, 6]],  # integers
    [[-1e-7, 3.25e2, 1e38], [0.1, 0.2, 0.3]],  # exponents, and a value near float32's largest
    [[7]],
])
def test_plain_rows_equal_the_general_path(rows):
    body = json.dumps({"inputs": rows}).encode()
    plain = _plain_rows(body)
    assert plain is not None
    np.testing.assert_array_equal(plain, general(body))


def test_random_rows_round_trip_exactly():
    rows = np.random.default_rng(0).random((5, 784)) * 255
    body = json.dumps({"inputs": rows.tolist()}).encode()
    np.testing.assert_array_equal(_plain_rows(body), rows)


@pytest.mark.parametrize("body", [
    b'{"inputs": [[1, [2]], [3, 4]]}',  # a nested value in a flat-looking row, same count as two rows of two
    b'{"inputs": [[1, 2, 3], [4]]}',  # ragged rows whose total divides evenly
    b'{"inputs": [[true, 2]]}',
    b'{"inputs": [[null, 2]]}',
    b'{"inputs": [[1, 2]], "inputs": [[3, 4]]}',  # a repeated key: the general path decides (the last wins)
    b'{"inputs": [[1, 2]], "id": "x"}',
    b'{"inputs": [1, 2]}',
    b'{"inputs": []}',
    b'{"inputs": [[1, NaN]]}',
    b'{"inputs": [[1, 99999999999999999999999]]}',
    b'{"inputs": [[[1, 2], [3, 4]]]}',  # nested rows
    b'{"rows": [[1, 2]]}',
    b'not json',
])
def test_anything_but_plain_rows_takes_the_general_path(body):
    assert _plain_rows(body) is None


@pytest.mark.parametrize("body, status, words", [
    (b'{"inputs": [[1, [2]], [3, 4]]}', 422, "ragged"),
    (b'{"inputs": [[1, 2, 3], [4]]}', 422, "ragged"),
    (b'{"inputs": [[true, 2]]}', 422, "booleans"),
    (b'{"inputs": [[1e39, 2]]}', 422, "overflows float32"),
    (b'{"inputs": [[1, NaN]]}', 422, "NaN"),
    (b'{"inputs": [[1, 2, 3]]}', 422, "each row must be 2 numbers"),
])
def test_refusals_are_the_same_either_way(body, status, words):
    with pytest.raises(ApiError) as refused:
        decode_rows(JSON, body, (2,), max_rows=10)
    assert refused.value.status == status and words in refused.value.detail


def test_a_repeated_key_keeps_the_last_value_as_orjson_does():
    rows, _ = decode_rows(JSON, b'{"inputs": [[1, 2]], "inputs": [[3, 4]]}', (2,), max_rows=10)
    np.testing.assert_array_equal(rows, [[3, 4]])
