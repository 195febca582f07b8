"""Serving from a registry in object storage: a real ``aeserve serve`` on an S3 registry (moto's server on loopback).

New versions arrive by polling; a store outage changes nothing for clients and shows in the log and on /metrics;
a restart while the store is down serves the local copy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from aeserve.models.remote import ObjectRegistry
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.s3 import ENV, free_port, start_s3_server, wait_until

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def serve(url: str, cache: Path, endpoint: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint, "AESERVE_ENGINE": "torch"}
    server = subprocess.Popen([sys.executable, "-m", "aeserve", "serve", "--registry", url, "--cache", str(cache), "--port", str(port),
                               "--poll-seconds", "0.3", "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    return server, f"http://127.0.0.1:{port}"


def encode(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/models/digits/encode", json={"inputs": np.ones((2, 64)).tolist()}, timeout=10)


@pytest.mark.slow
def test_serving_from_s3_follows_new_versions_and_survives_an_outage_and_a_restart_without_the_store(tmp_path):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    store = start_s3_server(port)  # this test's own store: it is killed midway
    servers: list[subprocess.Popen] = []
    log = tmp_path / "server.log"
    try:
        url = f"s3://aeserve-{uuid.uuid4().hex[:8]}/registry"
        registry = ObjectRegistry(url, tmp_path / "trainer-cache", endpoint_url=endpoint, skip_instance_cache=True, key=ENV["AWS_ACCESS_KEY_ID"],
                                  secret=ENV["AWS_SECRET_ACCESS_KEY"])
        registry.fs.mkdir(url.removeprefix("s3://").split("/")[0])
        assert train(digits_run("digits", "pca"), registry, progress=False) == 1

        cache = tmp_path / "cache"
        server, base = serve(url, cache, endpoint, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready")
        first = encode(base)
        assert first.status_code == 200 and first.headers["X-Model-Version"] == "1"

        # A new version reaches the server by polling.
        assert train(digits_run("digits", "pca", epochs=1), registry, progress=False) == 2
        wait_until(lambda: encode(base).headers.get("X-Model-Version") == "2", 30, "version 2 served")
        metrics = httpx.get(f"{base}/metrics").text
        assert "aeserve_registry_reachable 1.0" in metrics

        # The store goes away: clients see no change; the log and /metrics show it.
        store.kill()
        store.wait()
        wait_until(lambda: "aeserve_registry_reachable 0.0" in httpx.get(f"{base}/metrics").text, 30, "outage on /metrics")
        answers = [encode(base) for _ in range(20)]
        assert {(a.status_code, a.headers["X-Model-Version"]) for a in answers} == {(200, "2")}
        assert "unreachable, serving its local copy" in log.read_text()

        # A restart while the store is still down serves the local copy: both versions, latest = 2.
        server.terminate()
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        server, base = serve(url, cache, endpoint, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready from the local copy")
        again = encode(base)
        assert again.status_code == 200 and again.headers["X-Model-Version"] == "2"
        assert httpx.post(f"{base}/v1/models/digits/versions/1/encode", json={"inputs": np.ones((1, 64)).tolist()}).status_code == 200
        assert "aeserve_registry_reachable 0.0" in httpx.get(f"{base}/metrics").text
    finally:
        for server in servers:
            server.kill()
            server.wait()
        store.kill()
        store.wait()
