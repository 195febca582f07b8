"""Python client for other apps: numpy arrays in and out, ``.npy`` on the wire, sync and async.

    from aeserve.service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.encode("fmnist-mlp30", images)      # images: (n, 28, 28) or (n, 784)
        result.outputs, result.model, result.version
"""
from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import numpy as np

NPY = "application/x-npy"


class AeserveError(Exception):
    """An error answer from the service: ``status`` and the service's ``detail``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Result:
    outputs: np.ndarray  # float32; codes (n, code_dim), data (n, *input_shape) or coordinates (n, 2)
    model: str
    version: str
    errors: np.ndarray | None = None  # reconstruct only: (n,) summed squared errors
    percentiles: np.ndarray | None = None  # reconstruct only: (n,) 0-100 among held-out errors


def _path(name: str, op: str, version: str | int | None) -> str:
    return f"/v1/models/{name}/{op}" if version is None else f"/v1/models/{name}/versions/{version}/{op}"


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    """Integers of one or two bytes (pixels, say) and float16 cross as they are, and the server widens them to float32
    exactly: a batch of uint8 images is a quarter of its float32 size. Everything else crosses as float32, which is
    what the model computes in."""
    if (dtype.kind in "iu" and dtype.itemsize <= 2) or dtype == np.float16:
        return dtype
    return np.dtype(np.float32)


PIECE_BYTES = 1 << 18


class _NpyBody:
    """A ``.npy`` body as its header, then slices of the array's own memory: nothing is copied before the socket.

    Saving the array into a buffer copies it, and httpx joins a ``bytes`` body
    with its framing into one more fresh copy. For 10,000 Fashion-MNIST images
    as float32 (31 MB) that cost about 30 ms of a 300 ms encode on the 2-core
    development machine (benchmarks/SERVING.md). Each 256 KB piece is copied once
    by the HTTP layer, while it is still in cache. The object can be iterated
    again, so httpx can send it again.
    """

    def __init__(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        array = np.ascontiguousarray(array, dtype=_wire_dtype(array.dtype))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
        self.header = header.getvalue()
        self.data = memoryview(array.reshape(-1).view(np.uint8))

    def __len__(self) -> int:
        return len(self.header) + len(self.data)

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield self.header
        for start in range(0, len(self.data), PIECE_BYTES):
            yield self.data[start:start + PIECE_BYTES]


async def _async_pieces(body: _NpyBody) -> AsyncIterator[bytes | memoryview]:
    for piece in body:
        yield piece


def _request(op: str, array: np.ndarray) -> tuple[_NpyBody, dict]:
    # reconstruct answers errors and percentiles too, which only the JSON answer carries.
    accept = "application/json" if op == "reconstruct" else NPY
    body = _NpyBody(array)
    return body, {"Content-Type": NPY, "Accept": accept, "Content-Length": str(len(body))}


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise AeserveError(response.status_code, str(detail))


def _result(response: httpx.Response) -> Result:
    _check(response)
    model, version = response.headers.get("X-Model-Name", ""), response.headers.get("X-Model-Version", "")
    if response.headers.get("content-type", "").startswith(NPY):
        return Result(np.load(io.BytesIO(response.content), allow_pickle=False), model, version)
    body = response.json()
    optional = {k: np.asarray(body[k], dtype=np.float32) for k in ("errors", "percentiles") if k in body}
    return Result(np.asarray(body["outputs"], dtype=np.float32), body["model"], body["version"], **optional)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client. Raises AeserveError for error answers."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def _call(self, op: str, name: str, array: np.ndarray, version: str | int | None) -> Result:
        body, headers = _request(op, array)
        return _result(self._http.post(_path(name, op, version), content=body, headers=headers))

    def encode(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return self._call("encode", name, x, version)

    def decode(self, name: str, codes: np.ndarray, version: str | int | None = None) -> Result:
        return self._call("decode", name, codes, version)

    def reconstruct(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return self._call("reconstruct", name, x, version)

    def project(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return self._call("project", name, x, version)

    def models(self) -> list[dict]:
        response = self._http.get("/v1/models")
        _check(response)
        return response.json()["models"]

    def manifest(self, name: str, version: str | int | None = None) -> dict:
        response = self._http.get(f"/v1/models/{name}" if version is None else f"/v1/models/{name}/versions/{version}")
        _check(response)
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
    """Asyncio client with the same calls as Client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def _call(self, op: str, name: str, array: np.ndarray, version: str | int | None) -> Result:
        body, headers = _request(op, array)
        return _result(await self._http.post(_path(name, op, version), content=_async_pieces(body), headers=headers))

    async def encode(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("encode", name, x, version)

    async def decode(self, name: str, codes: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("decode", name, codes, version)

    async def reconstruct(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("reconstruct", name, x, version)

    async def project(self, name: str, x: np.ndarray, version: str | int | None = None) -> Result:
        return await self._call("project", name, x, version)

    async def models(self) -> list[dict]:
        response = await self._http.get("/v1/models")
        _check(response)
        return response.json()["models"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
