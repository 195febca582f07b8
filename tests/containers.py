"""The images as running containers, for tests/system/test_container.py and benchmarks/containers.py: ``podman run``
on a free loopback port, the time from start to ready, the image's HEALTHCHECK, SIGTERM and the exit status.

Needs podman; .ci/container installs it and points ``CONTAINERS_CONF`` at deploy/container/containers.conf.
"""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from tempfile import TemporaryFile
from time import perf_counter

from aeserve.training.distributed import free_port
from benchmarks.loadgen import wait_ready

CONTAINER_PORT = 8000  # the images' AESERVE_PORT


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def image_size_mb(image: str) -> float:
    """The image's size as podman reports it (uncompressed, every layer), in MB."""
    result = podman("image", "inspect", "--format", "{{.Size}}", image)
    if result.returncode:
        raise RuntimeError(f"podman image inspect {image}: {result.stderr.strip()}")
    return int(result.stdout) / 1e6


def train_in(image: str, registry: Path, config: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``aeserve train`` inside ``image`` from its own working directory, publishing into ``registry`` (mounted at
    /registry, writable by the image's user) from ``config`` (its folder mounted read-only at /configs)."""
    return podman("run", "--rm", "-v", f"{registry}:/registry", "-v", f"{config.parent}:/configs:ro", image,
                  "aeserve", "train", f"/configs/{config.name}", *flags, timeout=timeout)


class Container:
    """``podman run IMAGE`` in the foreground (``--rm``), its port 8000 on a free port of 127.0.0.1.

    ``run_args`` go to ``podman run`` before the image. As a context manager it removes the container on the way out
    if it is still running."""

    def __init__(self, image: str, *run_args: str) -> None:
        self.image, self.run_args = image, run_args
        self.name = f"aeserve-test-{uuid.uuid4().hex[:10]}"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None
        self._log = TemporaryFile("w+")

    def start(self, timeout: float = 120) -> float:
        """Start it and wait for ``/health/ready``; the seconds from ``podman run`` to ready (the container's
        creation included). Raises if it exits first or is not ready in ``timeout`` seconds, with its output."""
        port = self.url.rsplit(":", 1)[1]
        started = perf_counter()
        self.process = subprocess.Popen(["podman", "run", "--rm", "--name", self.name, "-p", f"127.0.0.1:{port}:{CONTAINER_PORT}",
                                         *self.run_args, self.image], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, self.process, timeout)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{self.image}: {e}\n{self.output()}") from None
        return perf_counter() - started

    def healthcheck(self) -> subprocess.CompletedProcess:
        """Run the image's HEALTHCHECK command once, now (``podman healthcheck run``): 0 when healthy."""
        return podman("healthcheck", "run", self.name)

    def signal(self, name: str) -> None:
        result = podman("kill", "--signal", name, self.name)
        if result.returncode:
            raise RuntimeError(f"podman kill --signal {name} {self.name}: {result.stderr.strip()}")

    def wait(self, timeout: float) -> int:
        """The container's exit status, once it has exited."""
        assert self.process is not None, "not started"
        return self.process.wait(timeout)

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            podman("rm", "--force", "--time", "0", self.name)
            self.process.wait(30)
        self._log.close()
