"""Load generators for the overload benchmark and its test: closed-loop (to find capacity) and open-loop (to exceed it).

A closed-loop client waits for each answer before it sends again, so it can never
push a server past its capacity; an open-loop client sends on a fixed schedule
whatever the server does, the way independent users do. The generator must be
much cheaper than the server, or it measures itself: httpx spent a whole core
at 250 requests/s and queued requests on the client side. So requests go out
through a minimal HTTP/1.1 client on asyncio streams (keep-alive connections,
a new one whenever all are busy), and health probes and memory samples run in a
thread of their own with a blocking client.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from aeserve.training.distributed import free_port


@dataclass
class Request:
    path: str
    body: bytes
    content_type: str
    accept: str = "application/x-npy"  # binary answers: the client spends nothing on reading JSON


def npy_request(path: str, rows: np.ndarray) -> Request:
    """A POST of ``rows`` as one .npy body."""
    buffer = io.BytesIO()
    np.save(buffer, rows)
    return Request(path, buffer.getvalue(), "application/x-npy")


@dataclass
class Outcome:
    """What a load phase saw: answers by status (or by error name), and latencies of the 2xx answers."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0
    retried: int = 0  # sent again on a new connection: the kept-alive one had been closed by the server

    @property
    def ok(self) -> int:
        return sum(count for status, count in self.statuses.items() if isinstance(status, int) and 200 <= status < 300)

    def unexpected(self, allowed: set[int]) -> dict:
        """Answers other than 2xx and ``allowed``, including transport errors (named by exception class)."""
        return {status: count for status, count in self.statuses.items()
                if not (isinstance(status, int) and (200 <= status < 300 or status in allowed))}


class _Stale(Exception):
    """The connection was closed before any answer arrived."""


class Connections:
    """Keep-alive HTTP/1.1 connections to one server; a request takes an idle one or opens a new one."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.retried = 0  # requests resent because their kept-alive connection had been closed

    async def post(self, request: Request) -> int:
        """Send one request and read the whole answer; returns the status.

        A kept-alive connection the server has meanwhile closed (uvicorn closes idle ones
        after 5 s) fails before any answer arrives; like httpx, retry once on a new one.
        """
        if self.idle:
            connection = self.idle.pop()
            try:
                return await self._exchange(connection, request)
            except _Stale:
                self.retried += 1
        return await self._exchange(await asyncio.open_connection(self.host, self.port), request)

    async def _exchange(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: Request) -> int:
        reader, writer = connection
        try:
            try:
                writer.write(f"POST {request.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {request.content_type}\r\n"
                             f"Accept: {request.accept}\r\nContent-Length: {len(request.body)}\r\n\r\n".encode() + request.body)
                await writer.drain()
                status_line = await reader.readline()
            except (ConnectionResetError, BrokenPipeError) as e:
                raise _Stale from e
            if not status_line:
                raise _Stale
            status = int(status_line.split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append(connection)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _send(connections: Connections, request: Request, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        status = await connections.post(request)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, _Stale) as e:
        outcome.statuses[type(e).__name__] += 1
        return
    outcome.statuses[status] += 1
    if 200 <= status < 300:
        outcome.latencies.append(time.perf_counter() - started)


async def closed_loop(base_url: str, request: Request, seconds: float, concurrency: int) -> Outcome:
    """``concurrency`` clients that each send again as soon as they have an answer."""
    outcome = Outcome()
    connections = Connections(base_url)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            outcome.sent += 1
            await _send(connections, request, outcome)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    outcome.seconds = time.perf_counter() - started
    outcome.retried = connections.retried
    connections.close()
    return outcome


async def open_loop(base_url: str, request: Request, rate: float, seconds: float) -> Outcome:
    """Send ``rate`` requests per second for ``seconds`` on a fixed schedule, whether answers come back or not."""
    outcome = Outcome()
    connections = Connections(base_url)
    tasks = set()
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(connections, request, outcome))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        outcome.sent += 1
    outcome.seconds = time.perf_counter() - started  # how long sending took: > seconds means the generator fell behind
    await asyncio.gather(*tasks)
    outcome.retried = connections.retried
    connections.close()
    return outcome


@contextlib.contextmanager
def served(registry: str | Path, models: list[str] | None = None):
    """``aeserve serve`` at its defaults on a free loopback port, ready; yields its base URL and stops it on exit."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "aeserve"), "serve", "--registry", str(registry), "--port", str(port)]
    server = subprocess.Popen(command + (["--models", ",".join(models)] if models else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, server)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until a server process answers /health/ready with 200; fail at once if it exits instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the server at {base_url} did not become ready in {timeout:.0f} s")


def processes(pid: int) -> list[int]:
    """``pid`` and its live child processes (a server's engine process, and its export child while one runs; Linux)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # none once ``pid`` has exited
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *children]


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` and its child processes in MB (Linux)."""
    return sum(own_rss_mb(p) for p in processes(pid))


def own_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` alone in MB (Linux); 0 once it has exited."""
    return proc_mb(pid, "status", "VmRSS")


def proc_mb(pid: int, file: str, field: str) -> float:
    """A kB field of /proc/PID/FILE in MB (``status``: VmRSS, VmHWM the peak so far; ``smaps_rollup``: Pss, shared
    pages divided among the processes sharing them); 0 once the process has exited."""
    try:
        text = Path(f"/proc/{pid}/{file}").read_text()
    except OSError:
        return 0.0
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time that process ``pid`` and its live child processes have used so far (Linux)."""
    total = 0
    for p in processes(pid):
        with contextlib.suppress(OSError):  # a child that exited meanwhile
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def main_thread_seconds(pid: int) -> float:
    """Seconds process ``pid``'s main thread (for a server: its event loop) has spent on a CPU so far (Linux schedstat)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def idle_ticks() -> tuple[int, int]:
    """(idle, all) clock ticks of every CPU of the machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


class Watch(threading.Thread):
    """While running: GET ``path`` every ``interval`` seconds (its own connection and thread), and sample ``pid``'s memory."""

    def __init__(self, base_url: str, pid: int, path: str = "/health/ready", interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.base_url, self.pid, self.path, self.interval = base_url, pid, path, interval
        self.health = Outcome()
        self.memory: list[tuple[float, float]] = []  # (seconds since start, resident MB)
        self._done = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._done.is_set():
                t = time.perf_counter()
                try:
                    status = client.get(self.path).status_code
                    self.health.statuses[status] += 1
                    self.health.latencies.append(time.perf_counter() - t)
                except httpx.HTTPError as e:
                    self.health.statuses[type(e).__name__] += 1
                self.health.sent += 1
                if not self.memory or t - started - self.memory[-1][0] >= 1.0:
                    self.memory.append((t - started, rss_mb(self.pid)))
                self._done.wait(self.interval)

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()


def overload(base_url: str, request: Request, rate: float, seconds: float, pid: int) -> tuple[Outcome, Outcome, list[tuple[float, float]]]:
    """Open-loop load at ``rate`` while readiness is probed every 100 ms and the server's memory about every second."""
    with Watch(base_url, pid) as watch:
        load = asyncio.run(open_loop(base_url, request, rate, seconds))
    return load, watch.health, watch.memory


def wait_idle(base_url: str, timeout: float = 120) -> float:
    """Seconds until the server reports an empty queue."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if re.search(r"^aeserve_queue_depth 0\.0$", httpx.get(f"{base_url}/metrics").text, re.M):
            return time.perf_counter() - started
        time.sleep(0.1)
    raise TimeoutError(f"the queue did not drain within {timeout} s")


@dataclass
class OverloadRun:
    """The three phases of an overload run: capacity before, the open-loop overload, capacity after."""

    before: Outcome
    load: Outcome
    health: Outcome  # readiness probes during the overload
    after: Outcome
    memory: list[tuple[float, float]]  # (seconds, resident MB) during the overload
    rss_before: float
    rss_after: float
    drain_seconds: float  # from the end of the overload to an empty queue

    @property
    def capacity(self) -> float:
        return self.before.ok / self.before.seconds


def overload_run(base_url: str, request: Request, pid: int, factor: float, seconds: float,
                 capacity_seconds: float, concurrency: int, warmup_seconds: float) -> OverloadRun:
    """Warm up, measure capacity closed-loop, send ``factor`` x that open-loop for ``seconds``, wait for an empty queue, measure again."""
    asyncio.run(closed_loop(base_url, request, warmup_seconds, concurrency))
    before = asyncio.run(closed_loop(base_url, request, capacity_seconds, concurrency))
    rss_before = rss_mb(pid)
    load, health, memory = overload(base_url, request, factor * before.ok / before.seconds, seconds, pid)
    drain_seconds = wait_idle(base_url)
    after = asyncio.run(closed_loop(base_url, request, capacity_seconds, concurrency))
    return OverloadRun(before, load, health, after, memory, rss_before, rss_mb(pid), drain_seconds)
