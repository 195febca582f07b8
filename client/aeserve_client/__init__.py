"""Python client for an aeserve server: numpy arrays in and out, ``.npy`` on the wire, sync and async.

Needs httpx and numpy only (no torch)::

    from aeserve_client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.encode("fmnist-mlp30", images)      # images: (n, 28, 28) or (n, 784)
        result.outputs, result.model, result.version
"""
from aeserve_client.client import DEFAULT_MAX_ROWS, AsyncClient, Client
from aeserve_client.errors import AeserveError, ConflictError, InvalidInputError, NotFoundError, OverloadedError, UnauthorizedError
from aeserve_client.wire import Neighbors, Result

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_ROWS",
    "AeserveError",
    "AsyncClient",
    "Client",
    "ConflictError",
    "InvalidInputError",
    "Neighbors",
    "NotFoundError",
    "OverloadedError",
    "Result",
    "UnauthorizedError",
]
