"""The client against a stand-in server (httpx.MockTransport): retries on 503/429 after Retry-After, arrays over
max_rows split and joined in order, typed errors, sync and async alike."""
from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import numpy as np
import pytest

import aeserve_client
from aeserve_client import (
    AeserveError,
    AsyncClient,
    Client,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    UnauthorizedError,
)
from aeserve_client import client as client_module
from aeserve_client.wire import retry_after_seconds


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def rows_sent(request: httpx.Request) -> np.ndarray:
    return np.load(io.BytesIO(request.content), allow_pickle=False)


class StandIn:
    """A stand-in server: answers each request with the next of ``failures`` (status, headers), then as a model whose
    encode sums each row (one output column) and whose reconstruct doubles it, with errors = row sum and
    percentiles = first element. Records every request's path and rows."""

    def __init__(self, failures: list[tuple[int, dict]] | None = None, version: str = "7") -> None:
        self.failures = list(failures or [])
        self.version = version
        self.requests: list[tuple[str, np.ndarray | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        rows = rows_sent(request) if request.method == "POST" else None
        self.requests.append((request.url.path, rows))
        if self.failures:
            status, headers = self.failures.pop(0)
            return httpx.Response(status, json={"detail": f"stand-in {status}"}, headers=headers)
        names = {"X-Model-Name": "m", "X-Model-Version": self.version}
        if request.url.path.endswith("/reconstruct"):
            flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:]))).astype(np.float32)
            body = {"model": "m", "version": self.version, "outputs": (2 * rows).tolist(),
                    "errors": flat.sum(axis=1).tolist(), "percentiles": flat[:, 0].tolist()}
            return httpx.Response(200, json=body, headers=names)
        if request.method == "GET":
            return httpx.Response(200, json={"models": [{"name": "m", "versions": [7], "aliases": {"latest": "7"}}]})
        sums = rows.reshape(len(rows), int(np.prod(rows.shape[1:]))).astype(np.float32).sum(axis=1, keepdims=True)
        return httpx.Response(200, content=npy(sums), headers={"Content-Type": "application/x-npy", **names})


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The client's sleeps, recorded instead of slept (sync and async)."""
    seen: list[float] = []

    async def async_sleep(seconds: float) -> None:
        seen.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", seen.append)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    return seen


ROWS = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)


# Retries ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [503, 429])
def test_overload_is_retried_after_retry_after_then_answered(waits, status):
    server = StandIn([(status, {"Retry-After": "2"}), (status, {"Retry-After": "0.25"})])
    with Client("http://test", transport=httpx.MockTransport(server)) as client:
        result = client.encode("m", ROWS)
    np.testing.assert_array_equal(result.outputs, ROWS.sum(axis=1, keepdims=True))
    assert waits == [2.0, 0.25]
    assert len(server.requests) == 3
    for _, rows in server.requests:  # the same body each time
        np.testing.assert_array_equal(rows, ROWS)


async def test_async_overload_is_retried_after_retry_after_then_answered(waits):
    server = StandIn([(503, {"Retry-After": "1"}), (429, {"Retry-After": "3"})])
    async with AsyncClient("http://test", transport=httpx.MockTransport(server)) as client:
        result = await client.encode("m", ROWS)
    np.testing.assert_array_equal(result.outputs, ROWS.sum(axis=1, keepdims=True))
    assert waits == [1.0, 3.0]
    assert len(server.requests) == 3
    for _, rows in server.requests:  # each attempt sends the whole body again
        np.testing.assert_array_equal(rows, ROWS)


def test_retries_are_bounded_and_then_raise_overloaded(waits):
    server = StandIn([(503, {"Retry-After": "1"})] * 10)
    with Client("http://test", transport=httpx.MockTransport(server)) as client, pytest.raises(OverloadedError) as error:
        client.encode("m", ROWS)
    assert waits == [1.0, 1.0, 1.0]  # max_retries=3 by default: four requests in all
    assert len(server.requests) == 4
    assert (error.value.status, error.value.detail, error.value.retry_after) == (503, "stand-in 503", 1.0)
    assert isinstance(error.value, AeserveError)


def test_each_wait_is_capped_and_the_bounds_are_configurable(waits):
    server = StandIn([(429, {"Retry-After": "3600"})] * 3)
    with Client("http://test", transport=httpx.MockTransport(server), max_retries=5, max_retry_wait=1.5) as client:
        assert client.encode("m", ROWS).outputs.shape == (10, 1)
    assert waits == [1.5, 1.5, 1.5]

    waits.clear()
    server = StandIn([(503, {"Retry-After": "1"})])
    with Client("http://test", transport=httpx.MockTransport(server), max_retries=0) as client, pytest.raises(OverloadedError):
        client.encode("m", ROWS)
    assert waits == [] and len(server.requests) == 1


def test_without_a_usable_retry_after_the_client_backs_off_doubling(waits):
    server = StandIn([(503, {}), (503, {"Retry-After": "soon"}), (503, {})])
    with Client("http://test", transport=httpx.MockTransport(server)) as client:
        client.encode("m", ROWS)
    assert waits == [0.5, 1.0, 2.0]


def test_retry_after_as_seconds_or_an_http_date():
    assert retry_after_seconds("1") == 1.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("later") is None
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert retry_after_seconds(in_a_minute) == pytest.approx(60, abs=2)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: at once


@pytest.mark.parametrize("status", [400, 401, 404, 413, 415, 422, 500, 502])
def test_other_statuses_are_never_retried(waits, status):
    server = StandIn([(status, {"Retry-After": "1"})])
    with Client("http://test", transport=httpx.MockTransport(server)) as client, pytest.raises(AeserveError) as error:
        client.encode("m", ROWS)
    assert error.value.status == status and error.value.detail == f"stand-in {status}"
    assert waits == [] and len(server.requests) == 1


def test_reads_are_retried_too(waits):
    server = StandIn([(503, {"Retry-After": "1"})])
    with Client("http://test", transport=httpx.MockTransport(server)) as client:
        assert [m["name"] for m in client.models()] == ["m"]
    assert waits == [1.0]


# Splitting over max_rows ------------------------------------------------------------------------------------------

def test_default_max_rows_is_the_servers_default():
    assert aeserve_client.DEFAULT_MAX_ROWS == 65_536
    with Client("http://test", transport=httpx.MockTransport(StandIn())) as client:
        assert client._options.max_rows == 65_536


def test_an_array_over_max_rows_goes_out_in_slices_and_the_answers_join_in_order():
    server = StandIn()
    x = np.random.default_rng(0).integers(0, 255, size=(10, 2, 3), dtype=np.uint8)
    with Client("http://test", transport=httpx.MockTransport(server), max_rows=4) as client:
        result = client.encode("m", x)
    assert [len(rows) for _, rows in server.requests] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in server.requests]), x)  # every row once, in order
    assert server.requests[0][1].dtype == np.uint8  # small integers still cross as they are
    np.testing.assert_array_equal(result.outputs, x.reshape(10, -1).sum(axis=1, keepdims=True).astype(np.float32))
    assert (result.model, result.version) == ("m", "7")
    # the first slice goes to latest; the others to the version that answered it, so one answer never mixes versions
    assert [path for path, _ in server.requests] == ["/v1/models/m/encode"] + ["/v1/models/m/versions/7/encode"] * 2


def test_reconstruct_joins_outputs_errors_and_percentiles():
    server = StandIn()
    with Client("http://test", transport=httpx.MockTransport(server), max_rows=3) as client:
        result = client.reconstruct("m", ROWS, version="prod")
    assert len(server.requests) == 4
    assert [path for path, _ in server.requests] == ["/v1/models/m/versions/prod/reconstruct"] + ["/v1/models/m/versions/7/reconstruct"] * 3
    np.testing.assert_array_equal(result.outputs, 2 * ROWS)
    np.testing.assert_array_equal(result.errors, ROWS.sum(axis=1))
    np.testing.assert_array_equal(result.percentiles, ROWS[:, 0])
    assert result.errors.dtype == result.percentiles.dtype == np.float32


async def test_async_splits_and_joins_in_order():
    server = StandIn()
    async with AsyncClient("http://test", transport=httpx.MockTransport(server), max_rows=4) as client:
        codes = await client.encode("m", ROWS)
        recon = await client.reconstruct("m", ROWS)
    assert [len(rows) for _, rows in server.requests] == [4, 4, 2, 4, 4, 2]
    np.testing.assert_array_equal(codes.outputs, ROWS.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(recon.errors, ROWS.sum(axis=1))
    np.testing.assert_array_equal(recon.percentiles, ROWS[:, 0])


def test_a_refused_slice_raises_and_no_more_slices_go_out():
    server = StandIn()

    def refuse_the_second(request: httpx.Request) -> httpx.Response:
        if len(server.requests) == 1:
            server.requests.append((request.url.path, rows_sent(request)))
            return httpx.Response(422, json={"detail": "row 1 holds a NaN"})
        return server(request)

    with Client("http://test", transport=httpx.MockTransport(refuse_the_second), max_rows=4) as client:
        with pytest.raises(InvalidInputError) as error:
            client.encode("m", ROWS)
    assert (error.value.status, error.value.detail) == (422, "row 5 holds a NaN")  # row 1 of the slice from row 4
    assert [len(rows) for _, rows in server.requests] == [4, 4]


def test_rows_at_or_under_max_rows_and_empty_arrays_go_in_one_request():
    server = StandIn()
    with Client("http://test", transport=httpx.MockTransport(server), max_rows=10) as client:
        assert client.encode("m", ROWS).outputs.shape == (10, 1)
        assert client.encode("m", np.zeros((0, 3), np.float32)).outputs.shape == (0, 1)
    assert [len(rows) for _, rows in server.requests] == [10, 0]


class Limited(StandIn):
    """A stand-in server that takes at most ``limit`` rows a request and names its limit in the 413 (``X-Max-Rows``),
    or does not when ``advertise`` is False."""

    def __init__(self, limit: int, advertise: bool = True) -> None:
        super().__init__()
        self.limit, self.advertise = limit, advertise

    def __call__(self, request: httpx.Request) -> httpx.Response:
        rows = rows_sent(request)
        if len(rows) > self.limit:
            self.requests.append((request.url.path, rows))
            headers = {"X-Max-Rows": str(self.limit)} if self.advertise else {}
            return httpx.Response(413, json={"detail": f"{len(rows)} rows exceed the limit of {self.limit} rows per request"},
                                  headers=headers)
        return super().__call__(request)


def test_a_413_naming_the_limit_makes_the_client_split_by_it_and_keep_it(waits):
    server = Limited(4)
    with Client("http://test", transport=httpx.MockTransport(server)) as client:  # no max_rows: the server's default
        codes = client.encode("m", ROWS)
        assert client._options.max_rows == 4
        again = client.encode("m", ROWS)
    assert [len(rows) for _, rows in server.requests] == [10, 4, 4, 2, 4, 4, 2]  # the limit is learned once
    np.testing.assert_array_equal(codes.outputs, ROWS.sum(axis=1, keepdims=True))
    np.testing.assert_array_equal(again.outputs, codes.outputs)
    assert waits == []  # nothing to wait for: the rows go again at once


async def test_async_learns_the_limit_too():
    server = Limited(3)
    async with AsyncClient("http://test", transport=httpx.MockTransport(server)) as client:
        recon = await client.reconstruct("m", ROWS)
    assert [len(rows) for _, rows in server.requests] == [10, 3, 3, 3, 1]
    np.testing.assert_array_equal(recon.outputs, 2 * ROWS)
    np.testing.assert_array_equal(recon.errors, ROWS.sum(axis=1))


@pytest.mark.parametrize("limit", ["", "0", "-3", "many", "10"])
def test_a_413_without_a_usable_smaller_limit_raises(limit):
    """No header, one that is not a whole number >= 1, or one no smaller than the rows sent: the 413 is the answer."""
    server = Limited(4, advertise=False)

    def answer(request: httpx.Request) -> httpx.Response:
        response = server(request)
        if limit and response.status_code == 413:
            response.headers["X-Max-Rows"] = limit
        return response

    with Client("http://test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(InvalidInputError) as error:
            client.encode("m", ROWS)
    assert (error.value.status, error.value.detail) == (413, "10 rows exceed the limit of 4 rows per request")
    assert len(server.requests) == 1


@pytest.mark.parametrize(("option", "value", "message"), [
    ("max_rows", 0, "max_rows=0: must be a whole number >= 1"),
    ("max_rows", 2.5, "max_rows=2.5: must be a whole number >= 1"),
    ("max_retries", -1, "max_retries=-1: must be a whole number >= 0"),
    ("max_retry_wait", -1.0, "max_retry_wait=-1.0: must be a number of seconds >= 0"),
])
def test_bad_settings_are_refused_when_the_client_is_built(option, value, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
        Client("http://test", **{option: value})


# Typed errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind"), [
    (404, NotFoundError), (400, InvalidInputError), (413, InvalidInputError), (415, InvalidInputError),
    (422, InvalidInputError), (401, UnauthorizedError), (503, OverloadedError), (429, OverloadedError), (500, AeserveError),
])
def test_each_error_status_raises_its_class_with_status_and_detail(status, kind):
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"detail": f"what was wrong ({status})"})

    with Client("http://test", transport=httpx.MockTransport(answer), max_retries=0) as client, pytest.raises(AeserveError) as error:
        client.decode("m", np.zeros((1, 4), np.float32))
    assert type(error.value) is kind
    assert (error.value.status, error.value.detail) == (status, f"what was wrong ({status})")
    assert str(error.value) == f"{status}: what was wrong ({status})"


def test_not_found_and_invalid_input_are_also_lookup_and_value_errors():
    assert issubclass(NotFoundError, LookupError) and issubclass(InvalidInputError, ValueError)


async def test_async_errors_are_typed_too():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "no model named 'nope'"})

    async with AsyncClient("http://test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(NotFoundError, match="no model named 'nope'"):
            await client.encode("nope", ROWS)
        with pytest.raises(NotFoundError):
            await client.manifest("nope")


def test_an_error_body_that_is_not_json_becomes_the_detail():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with Client("http://test", transport=httpx.MockTransport(answer)) as client, pytest.raises(AeserveError) as error:
        client.project("m", ROWS)
    assert (type(error.value), error.value.status, error.value.detail) == (AeserveError, 502, "<html>bad gateway</html>")


def test_the_main_package_re_exports_the_client():
    from aeserve.service import client as service_client

    assert service_client.Client is Client and service_client.AsyncClient is AsyncClient
    assert service_client.AeserveError is AeserveError and service_client.OverloadedError is OverloadedError


def test_a_table_versions_rows_come_back_as_the_server_wrote_them_and_join_across_slices():
    """A table version answers reconstruct with rows of numbers and category names: kept as rows, not made float32."""
    def table(request: httpx.Request) -> httpx.Response:
        rows = rows_sent(request)
        body = {"model": "t", "version": "1", "outputs": [[float(r[0]), "red"] for r in rows],
                "errors": rows[:, 0].tolist(), "percentiles": rows[:, 1].tolist()}
        return httpx.Response(200, json=body, headers={"X-Model-Name": "t", "X-Model-Version": "1"})

    with Client("http://test", transport=httpx.MockTransport(table), max_rows=4) as client:
        result = client.reconstruct("t", ROWS)
    assert result.outputs == [[float(r[0]), "red"] for r in ROWS]
    np.testing.assert_array_equal(result.errors, ROWS[:, 0])
    np.testing.assert_array_equal(result.percentiles, ROWS[:, 1])


def test_complex_numbers_are_refused_before_anything_is_sent():
    server = StandIn()
    with Client("http://test", transport=httpx.MockTransport(server)) as client:
        with pytest.raises(TypeError, match="the model takes real numbers; got an array of complex64"):
            client.encode("m", ROWS + 1j)
    assert server.requests == []
