"""Reliability: hostile registries, overload, reload under load with a corrupt version, isolation between versions."""
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from aeserve.models.checkpoint import MANIFEST, WEIGHTS
from aeserve.models.registry import Registry
from aeserve.service.client import Client
from aeserve.service.runtime.store import ModelStore
from aeserve.training.trainer import train
from benchmarks.loadgen import npy_request, overload_run, wait_ready
from tests.conftest import digits_run, tamper_version
from tests.servers import LiveServer, Traffic, free_port

IMAGES = (np.random.default_rng(5).random((3, 8, 8)) * 16).astype(np.float32)


def _tamper(registry, name, weights: bytes | None = None, **manifest_changes):
    tamper_version(registry, name, weights, **manifest_changes)


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


HOSTILE = {
    "header-claims-huge-length": lambda r, n: _tamper(r, n, weights=struct.pack("<Q", 2**60) + b"{}"),
    "offsets-past-the-end": lambda r, n: _tamper(r, n, weights=safetensors_bytes(
        {"model.mean": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, b"\0" * 16)),
    "overlapping-offsets": lambda r, n: _tamper(r, n, weights=safetensors_bytes(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        b"\0" * 24)),
    "pickle-instead-of-weights": lambda r, n: _tamper(r, n, weights=b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."),
    "unknown-kind": lambda r, n: _tamper(r, n, kind="os.system"),
    "absurd-sizes": lambda r, n: _tamper(r, n, config={"code_dim": 10**9}),
    "wrong-sha256": lambda r, n: _tamper(r, n, sha256="0" * 64),
    "manifest-not-json": lambda r, n: (r.version_dir(n, 1) / MANIFEST).write_text("{not json"),
    "manifest-contradicts-its-model": lambda r, n: _tamper(r, n, code_dim=9, input_shape=[64]),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_versions_are_refused_logged_and_the_good_model_keeps_serving(registry, trained_registry, attack, caplog):
    import shutil

    for name in ("good", "bad"):  # copies of a trained version (training each would cost a second per attack)
        shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / name / "1")
    HOSTILE[attack](registry, "bad")
    store = ModelStore(registry)
    with caplog.at_level(logging.ERROR, logger="aeserve.store"):
        store.refresh()
    assert store.names() == ["good"]
    assert "bad:1" in store.failed
    assert any("refused bad:1" in record.getMessage() for record in caplog.records)
    assert store.get("good").encode(IMAGES).shape == (3, 4)


def test_aliases_and_symlinks_that_lead_out_of_the_registry_are_ignored(registry, tmp_path):
    train(digits_run("m", "pca"), registry, progress=False)
    folder = registry.root / "m"
    (folder / "aliases.json").write_text(json.dumps({"latest": "1", "prod": "../../etc", "x": "/tmp"}))
    (tmp_path / "elsewhere").mkdir()
    (folder / "2").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / MANIFEST).write_text("{}")
    store = ModelStore(registry)
    store.refresh()
    assert store.entry("m").aliases == {"latest": 1}
    assert sorted(store.entry("m").versions) == [1]
    assert "outside the registry" in store.failed["m:2"]


def test_overload_answers_503_with_retry_after_and_recovers(service_registry):
    """Model calls held at a gate: the first two requests take the queue's two places, every other one is refused at
    once with 503 and Retry-After while liveness still answers, and once the gate opens the two are answered."""
    import asyncio

    with LiveServer(service_registry, poll_seconds=0, max_queue=2, max_batch_rows=8) as live:
        batcher, gate = live.app.state.batcher, threading.Event()
        run = batcher.run

        async def held(version, call, rows):
            await asyncio.to_thread(gate.wait, 60)
            return await run(version, call, rows)

        batcher.run = held
        body = json.dumps({"inputs": np.ones((20, 64), np.float32).tolist()}).encode()
        statuses, retry_after = [], []

        def post(_):
            response = httpx.post(f"{live.url}/v1/models/digits-mlp/reconstruct", content=body,
                                  headers={"Content-Type": "application/json"}, timeout=120)
            statuses.append(response.status_code)
            if response.status_code == 503:
                retry_after.append(response.headers.get("Retry-After"))

        health = []
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, i) for i in range(24)]
            deadline = time.monotonic() + 60
            while len(statuses) < 22 and time.monotonic() < deadline:  # the refused come back while two wait
                time.sleep(0.01)
            for _ in range(5):
                health.append(httpx.get(f"{live.url}/health/live", timeout=30).status_code)
            assert statuses.count(503) == 22 and "aeserve_queue_depth 2.0" in httpx.get(f"{live.url}/metrics").text
            gate.set()
            for f in futures:
                f.result()
        batcher.run = run
        assert sorted(statuses) == [200] * 2 + [503] * 22
        assert set(retry_after) == {"1"}
        assert health == [200] * 5
        with Client(live.url) as client:  # fully back once the load stops
            assert client.encode("digits-mlp", IMAGES).outputs.shape == (3, 4)
        assert "aeserve_queue_depth 0.0" in httpx.get(f"{live.url}/metrics").text


@pytest.mark.slow
def test_good_then_corrupt_version_published_under_load(service_registry, tmp_path):
    # Version 3 is built and corrupted elsewhere, then renamed into place: the server never sees it intact.
    scratch = Registry(tmp_path / "scratch")
    for _ in range(3):
        train(digits_run("digits-pca", "pca"), scratch, progress=False)
    weights = scratch.version_dir("digits-pca", 3) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with LiveServer(service_registry, poll_seconds=0.1) as live, Traffic(live.url, "digits-pca", IMAGES) as traffic:
        train(digits_run("digits-pca", "pca"), service_registry, progress=False)  # version 2: good
        os.rename(scratch.version_dir("digits-pca", 3), service_registry.root / "digits-pca" / "3")
        metrics = ""
        for _ in range(300):
            metrics = httpx.get(f"{live.url}/metrics").text
            if "aeserve_refused_versions 1.0" in metrics and traffic.versions and traffic.versions[-1] == "2":
                break
            time.sleep(0.05)
        settled = traffic.versions_after_settling()
    assert traffic.failures == []
    assert "aeserve_refused_versions 1.0" in metrics
    assert traffic.versions[0] == "1" and settled == {"2"}  # switched to the good version and stayed there


def test_concurrent_requests_to_different_versions_never_mix(service_registry):
    train(digits_run("digits-mlp", "mlp", epochs=1, seed=7), service_registry, progress=False)
    v1, v2 = service_registry.load("digits-mlp", 1), service_registry.load("digits-mlp", 2)
    rng = np.random.default_rng(0)
    inputs = [(rng.random((1 + i % 3, 8, 8)) * 16).astype(np.float32) for i in range(40)]
    with LiveServer(service_registry, poll_seconds=0) as live, Client(live.url) as client:
        def ask(i):
            version = 1 + i % 2
            return i, version, client.encode("digits-mlp", inputs[i], version=version)

        with ThreadPoolExecutor(8) as pool:
            for i, version, result in pool.map(ask, range(40)):
                expected = (v1 if version == 1 else v2).encode(inputs[i])
                assert result.version == str(version)
                np.testing.assert_allclose(result.outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_open_loop_load_at_twice_capacity_gets_only_200_or_503_and_the_service_recovers(service_registry):
    """The overload benchmark's procedure, short: capacity closed-loop, then twice that open-loop, then capacity again."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "aeserve", "serve", "--registry", str(service_registry.root), "--port", str(port),
                               "--models", "digits-conv", "--poll-seconds", "0", "--no-access-log", "--max-queue", "8", "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, server)
        rows = (np.random.default_rng(0).random((512, 8, 8)) * 16).astype(np.float32)
        request = npy_request("/v1/models/digits-conv/reconstruct", rows)
        run = overload_run(base, request, server.pid, factor=2, seconds=3.0, capacity_seconds=1.5, concurrency=8, warmup_seconds=0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run.before.unexpected(set()) == {} and run.before.ok > 0
    assert run.load.unexpected({503}) == {}  # only 200 and 503: no 5xx, no dropped connection
    assert run.load.ok > 0 and run.load.statuses[503] > 0  # the load really went past capacity, and still got work done
    assert run.health.ok == run.health.sent > 0  # readiness answered every probe during the overload
    assert run.after.unexpected(set()) == {} and run.after.ok > 0  # fully back
    assert max(mb for _, mb in run.memory) - run.rss_before < 100 and run.rss_after - run.rss_before < 100  # no growth with the load


def test_requests_beyond_max_inflight_get_503_before_their_body_is_read_and_health_still_answers(service_registry):
    with LiveServer(service_registry, poll_seconds=0, max_inflight=1) as live:
        body = json.dumps({"inputs": np.ones((50, 64)).tolist()}).encode()
        started, release = threading.Event(), threading.Event()

        def slow_body():  # keeps the first request in progress until released
            yield body[:10]
            started.set()
            release.wait(30)
            yield body[10:]

        answers = []
        first = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{live.url}/v1/models/digits-mlp/reconstruct", content=slow_body(), headers={"Content-Type": "application/json"}, timeout=60)))
        first.start()
        try:
            assert started.wait(10)
            refused = httpx.post(f"{live.url}/v1/models/digits-mlp/encode", content=body, headers={"Content-Type": "application/json"})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json() == {"detail": "overloaded: 1 requests are in progress; retry shortly"}
            assert httpx.get(f"{live.url}/v1/models").status_code == 503
            assert httpx.get(f"{live.url}/v2/models/digits-mlp").json()["error"].startswith("overloaded")
            assert httpx.get(f"{live.url}/health/ready").status_code == 200  # health is never refused
            assert httpx.get(f"{live.url}/v2/health/live").status_code == 200
        finally:
            release.set()
            first.join(60)
        assert answers[0].status_code == 200 and len(answers[0].json()["errors"]) == 50
        assert httpx.post(f"{live.url}/v1/models/digits-mlp/encode", content=body, headers={"Content-Type": "application/json"}).status_code == 200


@pytest.mark.parametrize("aliases", ['[' * 100_000 + ']' * 100_000, '{"prod": "' + '9' * 5000 + '"}', '{"prod": ' + '9' * 5000 + '}'])
def test_an_unreadable_aliases_file_counts_as_no_aliases_and_stops_no_model(registry, trained_registry, aliases):
    """Nested past the parser's recursion limit, or a version of thousands of digits: that model keeps its versions
    without aliases, and every other model still loads (the refresh used to raise for all of them)."""
    import shutil

    for name in ("good", "bad"):
        shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / name / "1")
    (registry.root / "bad" / "aliases.json").write_text(aliases)
    store = ModelStore(registry)
    store.refresh()
    assert store.names() == ["bad", "good"] and store.loaded_once
    assert store.entry("bad").aliases == {"latest": 1}


def test_a_version_folder_copied_under_another_number_or_with_linked_files_is_refused(registry, trained_registry, tmp_path):
    import shutil

    shutil.copytree(trained_registry.version_dir("digits-pca", 1), registry.root / "m" / "1")
    shutil.copytree(registry.root / "m" / "1", registry.root / "m" / "2")  # its manifest says version 1
    shutil.copytree(registry.root / "m" / "1", registry.root / "m" / "3")
    outside = tmp_path / "manifest.json"
    shutil.move(registry.root / "m" / "3" / MANIFEST, outside)
    (registry.root / "m" / "3" / MANIFEST).symlink_to(outside)
    store = ModelStore(registry)
    store.refresh()
    assert sorted(store.entry("m").versions) == [1]
    assert "the manifest is of version 1, but it sits in m/2" in store.failed["m:2"]
    assert "manifest.json: not a regular file" in store.failed["m:3"]
