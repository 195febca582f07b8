"""Ports and servers for the tests: the app in-process (TestClient runs its lifespan) or as uvicorn on loopback, waits
for readiness, and client traffic to keep one busy.

The web stack is imported only when a server is made: every session loads this module (tests/s3.py takes its ports here).
The apps run their models on the CPU; ``AESERVE_TEST_DEVICE=cuda`` runs the same tests with the models on a GPU.
``aeserve serve`` as its own process starts with ``serve_process`` and is waited for with ``benchmarks.loadgen.wait_ready``,
which the benchmarks use.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aeserve.training.distributed import free_port as free_port  # the product's: its local rendezvous takes one too

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from aeserve.models.registry import Registry

DEVICE = os.environ.get("AESERVE_TEST_DEVICE", "cpu")


def serve_process(*flags: str, **popen) -> tuple[subprocess.Popen, str]:
    """``aeserve serve FLAGS`` on a free port of 127.0.0.1, started (not yet ready), and its base URL; ``popen`` goes to
    subprocess.Popen (env, stdout, stderr), whose output is discarded unless told otherwise."""
    port = free_port()
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    process = subprocess.Popen([sys.executable, "-m", "aeserve", "serve", "--port", str(port), *flags], **popen)
    return process, f"http://127.0.0.1:{port}"


def wait_until(check: Callable[[], object], seconds: float, what: str) -> object:
    """Call ``check`` until it returns something true (an HTTP error counts as not yet); fail the test after ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def wait_ready(get, timeout: float = 30.0) -> None:
    """Poll ``get("/health/ready")`` (a TestClient's ``get``, or one over HTTP) until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError("service did not become ready")


def wait_for_metric(get, line: str, deadline: float) -> None:
    """Poll ``get("/metrics")`` until it holds ``line`` (say "aeserve_engine_process_versions 1.0"), failing the test at
    ``deadline`` (time.monotonic()): the ONNX export behind the engine metrics takes seconds."""
    while line not in get("/metrics").text:
        assert time.monotonic() < deadline, f"/metrics never showed {line!r}"
        time.sleep(0.1)


def make_client(registry: Registry, **settings) -> TestClient:
    """The app on ``registry`` in-process; entering the client runs its lifespan."""
    from fastapi.testclient import TestClient

    from aeserve.service.app import create_app
    from aeserve.service.settings import Settings

    app = create_app(Settings(**{"registry": registry.root, "poll_seconds": 0, "access_log": False, "device": DEVICE, **settings}))
    return TestClient(app, raise_server_exceptions=False)


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 in a background thread."""

    def __init__(self, registry: Registry, **settings) -> None:
        import uvicorn

        from aeserve.service.app import create_app
        from aeserve.service.settings import Settings

        self.port = free_port()
        self.app = create_app(Settings(registry=registry.root, access_log=False, device=DEVICE, port=self.port, **settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                wait_ready(lambda path: httpx.get(self.url + path), timeout=30)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Traffic:
    """Client threads calling ``encode`` in a loop until stopped; records every answer's version and every failure."""

    def __init__(self, url: str, model: str, rows, threads: int = 3) -> None:
        self.url, self.model, self.rows = url, model, rows
        self.versions: list[str] = []
        self.failures: list[Exception] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        from aeserve.service.client import Client

        with Client(self.url) as client:
            while not self._stop.is_set():
                try:
                    self.versions.append(client.encode(self.model, self.rows).version)
                except Exception as e:  # any failure at all is what the tests look for
                    self.failures.append(e)

    def versions_after_settling(self, seconds: float = 0.5, answers: int = 6, timeout: float = 30.0) -> set[str]:
        """Versions of the next ``answers`` answers once requests in flight at a switch have finished: counted, not
        timed, so a busy machine that answers slowly gives the same verdict (an empty set only if nothing answers)."""
        time.sleep(seconds)
        start, deadline = len(self.versions), time.monotonic() + timeout
        while len(self.versions) < start + answers and time.monotonic() < deadline:
            time.sleep(0.01)
        return set(self.versions[start:])

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
