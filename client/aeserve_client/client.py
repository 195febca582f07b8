"""Blocking and asyncio clients with the same calls: encode, decode, reconstruct, project, compress, decompress, neighbors,
models, manifest, ready.

Both retry an answer of 503 or 429 (the server is overloaded) a bounded number of times, waiting what its
``Retry-After`` says, and split an array of more rows than the server takes in one request into several requests,
joining the answers in order. The server's limit need not be known: a 413 that names it (``X-Max-Rows``) makes the
client keep it and send the refused rows again in slices of that size.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from typing import TypeVar

import httpx
import numpy as np

from aeserve_client import wire
from aeserve_client.wire import Neighbors, Result

T = TypeVar("T", np.ndarray, Sequence[bytes])

DEFAULT_MAX_ROWS = 65_536  # the server's default `max_rows`
RETRY_STATUSES = frozenset({429, 503})

# Looked up at each wait, so tests can replace them.
_sleep: Callable[[float], None] = time.sleep
_async_sleep = asyncio.sleep


class _Options:
    """The retry and splitting settings shared by Client and AsyncClient, checked when the client is built."""

    def __init__(self, max_retries: int, max_retry_wait: float, max_rows: int) -> None:
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r}: must be a whole number >= 0 (0 turns retries off)")
        if not max_retry_wait >= 0:
            raise ValueError(f"max_retry_wait={max_retry_wait!r}: must be a number of seconds >= 0")
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows={max_rows!r}: must be a whole number >= 1, at most the server's max_rows (default {DEFAULT_MAX_ROWS})")
        self.max_retries, self.max_retry_wait, self.max_rows = max_retries, float(max_retry_wait), max_rows

    def wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending the request again, or None to keep this answer. ``attempt``: retries so far."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        seconds = wire.retry_after_seconds(response.headers.get("Retry-After"))
        if seconds is None:  # no usable Retry-After: back off 0.5 s, 1 s, 2 s, ...
            seconds = 0.5 * 2 ** attempt
        return min(seconds, self.max_retry_wait)

    def slice(self, rows: T, start: int) -> T:
        """The slice of ``rows`` (an array (n, ...), or a list such as compressed streams) from row ``start``, of at most
        max_rows rows (an array's is a view, no copy); an array of no dimensions goes whole."""
        if getattr(rows, "ndim", 1) == 0 or (start == 0 and len(rows) <= self.max_rows):
            return rows
        return rows[start:start + self.max_rows]

    def learns_limit(self, response: httpx.Response, rows: T) -> bool:
        """Whether the server refused ``rows`` as more than it takes in one request and named its limit (a 413 with
        ``X-Max-Rows``, fewer than were sent). The limit is then kept, for this call's other slices and later calls,
        and the rows are to be sent again."""
        if response.status_code != 413:
            return False
        limit = wire.max_rows(response.headers.get("X-Max-Rows"))
        if limit is None or limit >= _count(rows):
            return False
        self.max_rows = limit
        return True


def _count(rows: np.ndarray | Sequence) -> int:
    """Rows in ``rows``; an array of no dimensions counts as one, sent as it is (the server says what is wrong)."""
    return 1 if getattr(rows, "ndim", 1) == 0 else len(rows)


def _request(op: str, rows: T) -> tuple[wire.NpyBody | bytes, dict[str, str]]:
    """The body and headers of ``op`` on ``rows``: decompress sends streams in JSON, every other operation .npy."""
    return wire.streams_request(rows) if op == "decompress" else wire.npy_request(op, rows)


Requests = Generator[tuple[str, wire.NpyBody | bytes, dict[str, str]], httpx.Response, list]


def _in_slices(options: _Options, array: T, request: Callable[[T, str | int | None], tuple[str, wire.NpyBody | bytes, dict[str, str]]],
               answer: Callable[[httpx.Response, int], Result | Neighbors], version: str | int | None) -> Requests:
    """One call as the requests it takes, for Client and AsyncClient alike: yields (path, body, headers) of each slice
    of ``array`` (``request(rows, version)``) and is sent its answer; returns the answers (``answer(response, first
    row)``) in order. The other slices go to the version that answered the first."""
    parts, start = [], 0
    while not parts or start < _count(array):
        rows = options.slice(array, start)
        response = yield request(rows, version)
        if options.learns_limit(response, rows):
            continue  # the same rows again, in slices of the server's limit
        parts.append(answer(response, start))
        version = parts[-1].version or version
        start += _count(rows)
    return parts


def _requests(options: _Options, op: str, name: str, array: np.ndarray | list[bytes], version: str | int | None,
              code_version: int | None = None) -> Generator[tuple[str, wire.NpyBody | bytes, dict[str, str]], httpx.Response, Result]:
    """``op`` on ``array`` as the requests it takes (``_in_slices``); returns the answers joined."""
    def request(rows, version):
        return wire.path(name, op, version, code_version), *_request(op, rows)

    parts = yield from _in_slices(options, array if op == "decompress" else np.asarray(array), request, wire.result, version)
    return wire.join(parts)


def _neighbor_requests(options: _Options, name: str, x: np.ndarray | None, codes: np.ndarray | None, k: int, version: str | int | None,
                       code_version: int | None) -> Generator[tuple[str, wire.NpyBody | bytes, dict[str, str]], httpx.Response, Neighbors]:
    """A neighbors call on rows ``x`` or on ``codes`` as the requests it takes (``_in_slices``); returns the answers joined."""
    if (x is None) == (codes is None):
        raise ValueError("give inputs (rows the version encodes) or codes (in the index's form), not both")

    def request(rows, version):
        body, headers, query = wire.neighbors_request(rows if x is not None else None, rows if codes is not None else None, k, code_version)
        return wire.path(name, "neighbors", version) + query, body, headers

    parts = yield from _in_slices(options, np.asarray(x if x is not None else codes), request, wire.neighbors_result, version)
    return wire.join_neighbors(parts)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client. Raises an AeserveError subclass for error answers (OverloadedError once retries run out).

    max_retries: how often a 503 or 429 answer is retried (0: never); each wait is the server's ``Retry-After``,
    at most max_retry_wait seconds. max_rows: the most rows sent in one request; bigger arrays go out as several
    requests, all to the version that answered the first. A server that takes fewer names its limit in its 413
    (``X-Max-Rows``), and the client splits by that limit from then on.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, *, max_retries: int = 3, max_retry_wait: float = 10.0,
                 max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self._options = _Options(max_retries, max_retry_wait, max_rows)
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(method, url, **kwargs)
            wait = self._options.wait(response, attempt)
            if wait is None:
                return response
            _sleep(wait)
            attempt += 1

    def _run(self, requests: Generator) -> Result | Neighbors:
        """Send each request the generator yields (``_in_slices``) and hand it the answer; its return value."""
        path, body, headers = next(requests)
        while True:
            try:
                path, body, headers = requests.send(self._send("POST", path, content=body, headers=headers))
            except StopIteration as done:
                return done.value

    def _call(self, op: str, name: str, array: np.ndarray | list[bytes], version: str | int | None, code_version: int | None = None) -> Result:
        return self._run(_requests(self._options, op, name, array, version, code_version))

    def encode(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        """x (n, *input_shape) or (n, prod(input_shape)) -> codes (n, code_dim), float32."""
        return self._call("encode", name, x, version)

    def decode(self, name: str, codes: np.ndarray, version: str | int | None = None, code_version: int | None = None) -> Result:
        """codes (n, code_dim) -> data (n, *input_shape), float32. ``code_version``: the version that made the codes (as
        encode's ``Result.version`` names it); a version other than that refuses them (ConflictError, 409)."""
        return self._call("decode", name, codes, version, code_version)

    def reconstruct(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        """x (n, ...) -> reconstructions (n, *input_shape), with errors (n,), anomaly scores (n,) and their percentiles (n,), float32."""
        return self._call("reconstruct", name, x, version)

    def project(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        """x (n, ...) -> 2-D map coordinates (n, 2), float32."""
        return self._call("project", name, x, version)

    def compress(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        """x (n, ...) -> one compressed stream (bytes) per row, in ``outputs``; for versions with an entropy model."""
        return self._call("compress", name, x, version)

    def decompress(self, name: str, streams: list[bytes], version: str | int | None = None) -> Result:
        """Streams -> data (n, *input_shape), float32; by default from the version the first stream names."""
        version = version if version is not None else wire.stream_version(streams[0]) if streams else None
        return self._call("decompress", name, streams, version)

    def neighbors(self, name: str, x: np.ndarray | None = None, *, codes: np.ndarray | None = None, k: int = 10,
                  version: str | int | None = None, code_version: int | None = None) -> Neighbors:
        """The k stored items nearest each row, from the server's index of the version's codes (``--index``): rows ``x``
        (n, ...) the version encodes, or ``codes`` (n, width) in the index's form with the version that made them
        (``code_version``: another version refuses them, ConflictError). More than max_rows rows go out as several
        requests, all to the version that answered the first."""
        return self._run(_neighbor_requests(self._options, name, x, codes, k, version, code_version))

    def models(self) -> list[dict]:
        response = self._send("GET", "/v1/models")
        wire.check(response)
        return response.json()["models"]

    def manifest(self, name: str, version: str | int | None = None) -> dict:
        response = self._send("GET", f"/v1/models/{name}" if version is None else f"/v1/models/{name}/versions/{version}")
        wire.check(response)
        return response.json()

    def ready(self) -> bool:
        return self._http.get("/health/ready").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """Asyncio client with the same calls and settings as Client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None, *, max_retries: int = 3, max_retry_wait: float = 10.0,
                 max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self._options = _Options(max_retries, max_retry_wait, max_rows)
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def _send(self, method: str, url: str, body: wire.NpyBody | bytes | None = None,
                    headers: dict[str, str] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            # A fresh iterator over the same memory for each attempt: an async generator runs only once.
            content = body if body is None or isinstance(body, bytes) else wire.async_pieces(body)
            response = await self._http.request(method, url, content=content, headers=headers)
            wait = self._options.wait(response, attempt)
            if wait is None:
                return response
            await _async_sleep(wait)
            attempt += 1

    async def _run(self, requests: Generator) -> Result | Neighbors:
        """Client._run, awaiting each answer."""
        path, body, headers = next(requests)
        while True:
            try:
                path, body, headers = requests.send(await self._send("POST", path, body, headers))
            except StopIteration as done:
                return done.value

    async def _call(self, op: str, name: str, array: np.ndarray | list[bytes], version: str | int | None,
                    code_version: int | None = None) -> Result:
        return await self._run(_requests(self._options, op, name, array, version, code_version))

    async def encode(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("encode", name, x, version)

    async def decode(self, name: str, codes: np.ndarray, version: str | int | None = None, code_version: int | None = None) -> Result:
        return await self._call("decode", name, codes, version, code_version)

    async def reconstruct(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("reconstruct", name, x, version)

    async def project(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("project", name, x, version)

    async def compress(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("compress", name, x, version)

    async def decompress(self, name: str, streams: list[bytes], version: str | int | None = None) -> Result:
        version = version if version is not None else wire.stream_version(streams[0]) if streams else None
        return await self._call("decompress", name, streams, version)

    async def neighbors(self, name: str, x: np.ndarray | None = None, *, codes: np.ndarray | None = None, k: int = 10,
                        version: str | int | None = None, code_version: int | None = None) -> Neighbors:
        return await self._run(_neighbor_requests(self._options, name, x, codes, k, version, code_version))

    async def models(self) -> list[dict]:
        response = await self._send("GET", "/v1/models")
        wire.check(response)
        return response.json()["models"]

    async def manifest(self, name: str, version: str | int | None = None) -> dict:
        response = await self._send("GET", f"/v1/models/{name}" if version is None else f"/v1/models/{name}/versions/{version}")
        wire.check(response)
        return response.json()

    async def ready(self) -> bool:
        return (await self._http.get("/health/ready")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
