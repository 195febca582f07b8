"""`aeserve serve` as a real process: SIGTERM lets in-flight requests finish before exit."""
import os
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import orjson
import pytest

from benchmarks.loadgen import wait_ready
from tests.servers import serve_process

pytestmark = pytest.mark.slow  # a server process drained after SIGTERM


def test_sigterm_drains_in_flight_requests(service_registry):
    env = {**os.environ, "AESERVE_REGISTRY": str(service_registry.root), "AESERVE_DEVICE": "cpu"}
    server, base = serve_process("--poll-seconds", "0", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, server)
        body = orjson.dumps({"inputs": np.ones((1000, 64), np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
        started = threading.Event()

        def slow_body():  # the request stays in flight while its body trickles in
            for i in range(0, len(body), len(body) // 10 + 1):
                yield body[i:i + len(body) // 10 + 1]
                started.set()
                time.sleep(0.1)

        answers = []
        request = threading.Thread(target=lambda: answers.append(httpx.post(
            base + "/v1/models/digits-mlp/reconstruct", content=slow_body(), headers={"Content-Type": "application/json"}, timeout=60)))
        request.start()
        assert started.wait(10)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(base + "/health/ready").status_code == 503  # load balancers: stop sending
        assert httpx.get(base + "/v1/models").status_code == 200  # but requests are still served during the grace
        request.join(60)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert len(answers) == 1 and answers[0].status_code == 200
        assert len(answers[0].json()["errors"]) == 1000
    finally:
        if server.poll() is None:
            server.kill()
