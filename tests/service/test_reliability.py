"""Reliability of a running server: overload, reload under load with a corrupt version, isolation between versions,
the in-flight limit. Hostile registries are the store's tests (tests/service/runtime/test_store.py)."""
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from aeserve.models.checkpoint import WEIGHTS
from aeserve.models.registry import Registry
from aeserve.service.client import Client
from aeserve.training.trainer import train
from benchmarks.loadgen import npy_request, overload_run, wait_ready
from tests.conftest import digits_run
from tests.servers import LiveServer, Traffic, serve_process

IMAGES = (np.random.default_rng(5).random((3, 8, 8)) * 16).astype(np.float32)


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
    server, base = serve_process("--registry", str(service_registry.root), "--models", "digits-conv", "--poll-seconds", "0",
                                 "--no-access-log", "--max-queue", "8", "--device", "cpu")
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
