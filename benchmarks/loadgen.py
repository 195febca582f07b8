"""Load generators for the overload benchmark and its test: closed-loop (to find capacity) and open-loop (to exceed it).

A closed-loop client waits for each answer before it sends again, so it can never
push a server past its capacity; an open-loop client sends on a fixed schedule
whatever the server does, the way independent users do. Both run on asyncio with
httpx, one connection per request in flight.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Request:
    path: str
    body: bytes
    content_type: str


@dataclass
class Outcome:
    """What a load phase saw: answers by status (or by error name), and latencies of the 2xx answers."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(count for status, count in self.statuses.items() if isinstance(status, int) and 200 <= status < 300)

    def unexpected(self, allowed: set[int]) -> dict:
        """Answers other than 2xx and ``allowed``, including transport errors (named by exception class)."""
        return {status: count for status, count in self.statuses.items()
                if not (isinstance(status, int) and (200 <= status < 300 or status in allowed))}


async def _send(client: httpx.AsyncClient, request: Request, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        response = await client.post(request.path, content=request.body, headers={"Content-Type": request.content_type})
    except httpx.HTTPError as e:
        outcome.statuses[type(e).__name__] += 1
        return
    outcome.statuses[response.status_code] += 1
    if response.is_success:
        outcome.latencies.append(time.perf_counter() - started)


def client_for(base_url: str, timeout: float = 60.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def closed_loop(base_url: str, request: Request, seconds: float, concurrency: int) -> Outcome:
    """``concurrency`` clients that each send again as soon as they have an answer."""
    outcome = Outcome()
    async with client_for(base_url) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                outcome.sent += 1
                await _send(client, request, outcome)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        outcome.seconds = time.perf_counter() - started
    return outcome


async def open_loop(base_url: str, request: Request, rate: float, seconds: float) -> Outcome:
    """Send ``rate`` requests per second for ``seconds`` on a fixed schedule, whether answers come back or not."""
    outcome = Outcome()
    async with client_for(base_url) as client:
        tasks = set()
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_send(client, request, outcome))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            outcome.sent += 1
        outcome.seconds = time.perf_counter() - started  # how long sending took: > seconds means the generator fell behind
        await asyncio.gather(*tasks)
    return outcome


async def probe(base_url: str, path: str, interval: float, stop: asyncio.Event) -> Outcome:
    """GET ``path`` every ``interval`` seconds on its own connection until ``stop`` is set."""
    outcome = Outcome()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await client.get(path)
                outcome.statuses[response.status_code] += 1
                outcome.latencies.append(time.perf_counter() - started)
            except httpx.HTTPError as e:
                outcome.statuses[type(e).__name__] += 1
            outcome.sent += 1
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    return outcome


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (Linux)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15 of stat


async def sample_memory(pid: int, interval: float, stop: asyncio.Event) -> list[tuple[float, float]]:
    """(seconds since start, resident MB) of process ``pid`` every ``interval`` seconds until ``stop`` is set."""
    samples = []
    started = time.perf_counter()
    while not stop.is_set():
        samples.append((time.perf_counter() - started, rss_mb(pid)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    return samples


async def overload(base_url: str, request: Request, rate: float, seconds: float, pid: int) -> tuple[Outcome, Outcome, list[tuple[float, float]]]:
    """Open-loop load at ``rate`` while /health/ready is probed every 100 ms and the server's memory every second."""
    stop = asyncio.Event()
    health = asyncio.create_task(probe(base_url, "/health/ready", 0.1, stop))
    memory = asyncio.create_task(sample_memory(pid, 1.0, stop))
    try:
        load = await open_loop(base_url, request, rate, seconds)
    finally:
        stop.set()
    return load, await health, await memory


def wait_idle(base_url: str, timeout: float = 120) -> float:
    """Seconds until the server reports an empty queue."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if re.search(r"^aeserve_queue_depth 0\.0$", httpx.get(f"{base_url}/metrics").text, re.M):
            return time.perf_counter() - started
        time.sleep(0.1)
    raise TimeoutError(f"the queue did not drain within {timeout} s")
