"""An S3 API server on loopback for the tests: moto's server mode, as s3fs's own suite uses it.

The session fixture ``s3_server`` starts one ``moto.server`` on a free port of 127.0.0.1 and sets the standard
AWS environment (``AWS_ENDPOINT_URL`` and dummy credentials) so that s3fs, boto and aeserve's child processes
all find it; ``s3_bucket`` gives each test a fresh, empty bucket and returns its ``s3://`` URL.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import free_port

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3_server(port: int) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:``port``, answering once this returns. Its state lives in the process."""
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server, with the AWS environment pointing at it for the whole session."""
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    pytest.importorskip("s3fs", reason="s3fs is the aeserve[s3] extra")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_s3_server(port)
    saved = {key: os.environ.get(key) for key in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the test S3 server, as ``s3://NAME``."""
    import s3fs

    name = f"aeserve-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
