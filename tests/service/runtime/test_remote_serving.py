"""Serving from a registry in object storage: a real ``aeserve serve`` on an S3 registry (moto's server on loopback).

New versions arrive by polling; a store outage changes nothing for clients and shows in the log and on /metrics;
a restart while the store is down serves the local copy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from aeserve.models.registry import NotFoundError
from aeserve.models.remote import ObjectRegistry
from aeserve.service.runtime.store import ModelStore
from aeserve.training.trainer import train
from tests.conftest import digits_run
from tests.s3 import ENV, start_s3_server
from tests.servers import free_port, serve_process, wait_until

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def serve(url: str, cache: Path, endpoint: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint, "AESERVE_ENGINE": "torch"}
    return serve_process("--registry", url, "--cache", str(cache), "--poll-seconds", "0.3", "--device", "cpu", env=env, stderr=log.open("ab"))


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


def test_the_store_follows_its_registry_url_when_versions_are_deleted_or_replaced(s3_bucket, tmp_path):
    """In process: what a poll does to the versions served, without a server."""
    url = f"{s3_bucket}/registry"
    registry = ObjectRegistry(url, tmp_path / "trainer-cache", skip_instance_cache=True)
    assert [train(digits_run("digits", "pca"), registry, progress=False) for _ in range(2)] == [1, 2]
    mirror = ObjectRegistry(url, tmp_path / "cache", skip_instance_cache=True).mirror()
    store = ModelStore(mirror.local, source=mirror)
    assert store.refresh() == ["digits:1", "digits:2"]
    old = store.get("digits", "1")

    registry.fs.rm(f"{registry.root}/digits/2", recursive=True)
    assert store.refresh() == []
    with pytest.raises(NotFoundError, match=r"no loaded version or alias '2'; versions: \[1\]"):
        store.get("digits", "2")
    assert store.get("digits").version == 1 and store.entry("digits").aliases == {"latest": 1}
    assert (store.source_removed, store.source_replaced) == (1, 0)

    bucket = s3_bucket.removeprefix("s3://")
    registry.fs.rm(bucket, recursive=True)
    registry.fs.mkdir(bucket)
    assert train(digits_run("digits", "linear", epochs=1), registry, progress=False) == 1
    assert store.refresh() == ["digits:1"]
    new = store.get("digits", "1")
    assert new is not old and new.manifest["sha256"] == registry.manifest("digits", 1)["sha256"] != old.manifest["sha256"]
    assert (store.source_removed, store.source_replaced) == (1, 1)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    assert server.wait(30) in (0, -signal.SIGTERM)


def encode_version(base: str, version: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/models/digits/versions/{version}/encode", json={"inputs": np.ones((2, 64)).tolist()}, timeout=10)


def metric(base: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{base}/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.slow
def test_a_version_deleted_from_the_store_stops_being_served_while_running_and_after_a_restart(s3_server, s3_bucket, tmp_path):
    url, log, servers = f"{s3_bucket}/registry", tmp_path / "server.log", []
    registry = ObjectRegistry(url, tmp_path / "trainer-cache", skip_instance_cache=True)
    assert [train(digits_run("digits", "pca"), registry, progress=False) for _ in range(3)] == [1, 2, 3]
    try:
        server, base = serve(url, tmp_path / "cache", s3_server, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready")
        assert encode(base).headers["X-Model-Version"] == "3"

        registry.fs.rm(f"{registry.root}/digits/3", recursive=True)
        wait_until(lambda: encode_version(base, 3).status_code == 404, 30, "version 3 no longer served")
        assert encode_version(base, 3).json() == {
            "detail": "model 'digits' has no loaded version or alias '3'; versions: [1, 2], aliases: ['latest']"}
        assert encode(base).headers["X-Model-Version"] == "2"
        assert "no longer serving digits:3: the registry " + url in log.read_text()
        assert metric(base, "aeserve_registry_removed_versions") == 1.0

        stop(server)
        server, base = serve(url, tmp_path / "cache", s3_server, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready after the restart")
        assert encode_version(base, 3).status_code == 404
        assert encode(base).headers["X-Model-Version"] == "2"
        assert httpx.get(f"{base}/v1/models").json()["models"] == [{"name": "digits", "versions": ["1", "2"], "aliases": {"latest": "2"}}]
    finally:
        for server in servers:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_a_recreated_bucket_serves_its_new_weights_after_a_restart_and_while_running(s3_server, s3_bucket, tmp_path):
    url, log, servers = f"{s3_bucket}/registry", tmp_path / "server.log", []
    registry = ObjectRegistry(url, tmp_path / "trainer-cache", skip_instance_cache=True)
    bucket = s3_bucket.removeprefix("s3://")

    def recreate_with(epochs: int) -> str:
        """The bucket deleted and made again, with other weights published as version 1; their sha256."""
        registry.fs.rm(bucket, recursive=True)
        registry.fs.mkdir(bucket)
        assert train(digits_run("digits", "linear", epochs=epochs), registry, progress=False) == 1
        return registry.manifest("digits", 1)["sha256"]

    def served(base: str) -> str:
        return httpx.get(f"{base}/v1/models/digits/versions/1").json().get("sha256")

    def expected_codes() -> np.ndarray:
        return registry.load("digits", 1).encode(np.ones((2, 64), np.float32))

    assert train(digits_run("digits", "pca"), registry, progress=False) == 1
    try:
        server, base = serve(url, tmp_path / "cache", s3_server, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready")
        old = served(base)
        stop(server)

        # Recreated while the server is down: the restart finds its copy differs from the store, and replaces it.
        new = recreate_with(epochs=1)
        assert new != old
        server, base = serve(url, tmp_path / "cache", s3_server, log)
        servers.append(server)
        wait_until(lambda: httpx.get(f"{base}/health/ready").status_code == 200, 60, "ready after the restart")
        assert served(base) == new
        np.testing.assert_allclose(encode(base).json()["outputs"], expected_codes(), rtol=1e-5, atol=1e-6)
        assert metric(base, "aeserve_registry_replaced_versions") == 1.0
        assert f"digits:1 in {url} differs from the local copy (its manifest changed): replaced" in log.read_text()

        # Recreated while it runs: a poll brings the new weights.
        newer = recreate_with(epochs=2)
        assert newer not in (old, new)
        wait_until(lambda: served(base) == newer, 30, "the new version 1 served")
        np.testing.assert_allclose(encode(base).json()["outputs"], expected_codes(), rtol=1e-5, atol=1e-6)
    finally:
        for server in servers:
            server.kill()
            server.wait()
