"""Request bodies to rows: reading the body from ASGI messages, and the simdjson lane for plain numeric rows, which
agrees with the general path or steps aside."""
import asyncio
import io
import json

import numpy as np
import orjson
import pytest

from aeserve.service.api.errors import V1, status_of
from aeserve.service.codec import JSON, NPY, _plain_rows, parse_rows, read_body, validate_rows
from aeserve.service.errors import ServiceError


def decode_rows(sent_as, body, row_shape, max_rows):
    """A body through the v1 codec and the one validator, as the pipeline takes it."""
    return validate_rows(parse_rows(sent_as, body), row_shape, max_rows)


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
    with pytest.raises(ServiceError) as refused:
        decode_rows(JSON, body, (2,), max_rows=10)
    assert status_of(refused.value, V1) == status and words in refused.value.message


def test_a_repeated_key_keeps_the_last_value_as_orjson_does():
    rows, _ = decode_rows(JSON, b'{"inputs": [[1, 2]], "inputs": [[3, 4]]}', (2,), max_rows=10)
    np.testing.assert_array_equal(rows, [[3, 4]])


@pytest.mark.parametrize("body", [b'{"inputs": [[1, 2.5]]}', b'{"inputs": [[[1, 2.5]]]}', b'{"inputs": [[1, NaN]]}'])
def test_a_body_in_a_buffer_decodes_as_the_same_bytes_do(body):
    """Bodies read in several pieces arrive as a bytearray: both JSON paths take it as they take bytes."""
    def outcome(b):
        try:
            return decode_rows(JSON, b, (2,), max_rows=10)[0].tolist()
        except ServiceError as e:
            return status_of(e, V1), e.message
    assert outcome(bytearray(body)) == outcome(body)


def read(chunks: list[bytes], content_length: str | None, limit: int = 1000, disconnect: bool = False):
    """read_body over ASGI messages carrying ``chunks`` (then a disconnect, if asked)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or disconnect} for i, c in enumerate(chunks)]
    messages += [{"type": "http.disconnect"}] if disconnect else []

    async def receive():
        return messages.pop(0)
    return asyncio.run(read_body(receive, content_length, limit))


@pytest.mark.parametrize("content_length", [None, "11"])
@pytest.mark.parametrize("chunks", [[b"hello world"], [b"hel", b"lo w", b"", b"orld"]])
def test_a_body_is_read_whole_however_it_is_split(chunks, content_length):
    assert bytes(read(chunks, content_length)) == b"hello world"


@pytest.mark.parametrize("chunks, content_length, status, words", [
    ([b"hello", b" world"], "5", 400, "longer than its Content-Length of 5"),
    ([b"hel", b"lo"], "11", 400, "holds 5 bytes but its Content-Length says 11"),
    ([b"x"], "5 bytes", 400, "Content-Length must be a number"),
    ([b"x"], "1001", 413, "1001 bytes exceeds the limit of 1000"),
    ([b"x" * 600, b"x" * 600], None, 413, "exceeds the limit of 1000"),
])
def test_a_body_that_breaks_its_framing_or_the_limit_is_refused(chunks, content_length, status, words):
    with pytest.raises(ServiceError) as refused:
        read(chunks, content_length)
    assert status_of(refused.value, V1) == status and words in refused.value.message


@pytest.mark.parametrize("content_length", [None, "11"])
def test_a_client_that_leaves_mid_body_is_refused(content_length):
    with pytest.raises(ServiceError, match="closed the connection"):
        read([b"hel", b"lo"], content_length, disconnect=True)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_npy_body_read_in_pieces_decodes_to_its_rows():
    rows = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    body = npy(rows)
    read_back = read([body[i:i + 97] for i in range(0, len(body), 97)], str(len(body)), limit=len(body))
    decoded, shape = decode_rows(NPY, read_back, (6,), max_rows=50)
    np.testing.assert_array_equal(decoded, rows)
    assert shape == (6,)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_body_of_any_float_width_refuses_what_is_not_finite_by_its_row(dtype, bad):
    rows = np.zeros((3, 6), dtype)
    rows[2, 4] = bad
    with pytest.raises(ServiceError) as refused:
        decode_rows(NPY, npy(rows), (6,), max_rows=3)
    assert status_of(refused.value, V1) == 422 and str(refused.value.message).startswith("row 2 holds a NaN, an infinity")


def test_the_bound_holds_for_small_integer_and_half_precision_bodies():
    for dtype in (np.float16, np.int16):
        rows = np.zeros((2, 6), dtype)
        rows[1, 0] = 20000
        np.testing.assert_array_equal(validate_rows(rows, (6,), 2, bound=30000.0)[0], rows.astype(np.float32))
        with pytest.raises(ServiceError) as refused:
            validate_rows(rows, (6,), 2, bound=1000.0)
        assert status_of(refused.value, V1) == 422 and str(refused.value.message).startswith("row 1 holds a value beyond ±1000")


@pytest.mark.parametrize("shape", ["(-1, -64)", "(-8, -8)", "(True, 64)", "(1, False, 64)"])
def test_an_npy_header_with_a_shape_that_is_not_sizes_is_refused(shape):
    body = npy(np.zeros((4, 64), np.float32))
    header = body[:128].decode("latin1")
    start, end = header.index("'shape': ") + len("'shape': "), header.index("), ") + 1
    forged = header[:start] + shape + header[end:]
    forged = forged[:-1].ljust(127) + "\n"  # the header keeps its length, so only the shape is wrong
    with pytest.raises(ServiceError) as refused:
        decode_rows(NPY, forged.encode("latin1") + body[128:], (64,), max_rows=8)
    assert status_of(refused.value, V1) == 400 and "shape must be non-negative integers" in str(refused.value.message)


def test_a_null_in_json_rows_is_refused_by_its_row():
    with pytest.raises(ServiceError) as refused:
        decode_rows(JSON, b'{"inputs": [[1, 2, 3], [4, null, 6]]}', (3,), max_rows=2)
    assert status_of(refused.value, V1) == 422 and refused.value.message == "row 1 holds null; inputs must be numbers"
