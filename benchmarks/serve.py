"""Serving benchmark: throughput against the HTTP stack's ceiling, big .npy batches, latency, memory, start-up.

    .venv/bin/python -m benchmarks.serve --registry registry --model fmnist-mlp30

Measures `aeserve serve --registry R --port P` with every other setting at its default; `--serve-args` adds flags
(the results then say so). Needs `wrk` (Debian package) for (a). Starts each server as its own process on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import cpu_seconds, idle_ticks, main_thread_seconds, own_rss_mb, processes, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parent.parent

WARM_TURNS = 4  # (b): turns not counted while the server's heap grows to a big request's needs


def start(command: list[str], port: int, env: dict | None = None) -> tuple[subprocess.Popen, float]:
    """Start a server process; (the process, seconds from start to ready)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
    except (RuntimeError, TimeoutError):
        process.kill()
        raise
    return process, time.perf_counter() - started


def memory(pid: int) -> str:
    """The server's resident memory with its child processes' (the engine process), and each on its own."""
    parts = [f"{own_rss_mb(p):.0f}" for p in processes(pid)]
    return f"{rss_mb(pid):.0f} MB" + (f" ({' + '.join(parts)} MB: server + engine process)" if len(parts) > 1 else "")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


def wait_for_engine(base: str, engine_process: bool, timeout: float = 120.0) -> float:
    """Seconds until the server's version runs its small batches on ONNX Runtime (after ready, the export may still run),
    in the engine process if it has one."""
    started = time.perf_counter()
    wanted = "aeserve_engine_process_versions 1.0" if engine_process else "aeserve_onnx_engine_versions 1.0"
    while wanted not in httpx.get(f"{base}/metrics").text:
        if time.perf_counter() - started > timeout:
            raise TimeoutError("the ONNX engine did not arrive; see the server log")
        time.sleep(0.1)
    return time.perf_counter() - started


def _run_wrk(url: str, body: str, seconds: int, connections: int, *extra: str) -> str:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[{body}]==]\n')
    script.close()
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", script.name, *extra, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise RuntimeError(f"wrk saw {non_2xx.group(1)} error answers:\n{out}")
    return out


def wrk(url: str, body: str, seconds: int, connections: int) -> tuple[float, int]:
    """(requests per second, requests answered)."""
    out = _run_wrk(url, body, seconds, connections)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), int(re.search(r"(\d+) requests in", out).group(1))


def wrk_latency(url: str, body: str, seconds: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds of one request at a time, from wrk's latency distribution."""
    out = _run_wrk(url, body, seconds, 1, "--latency")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def percentile(p: int) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * scale[unit]
    return percentile(50), percentile(99)


@dataclass
class Round:
    """One wrk run against one server."""

    rate: float  # requests per second
    cpu_us: float  # server CPU per request: all its threads and its child processes (the engine process)
    loop_busy: float  # share of the run the server's main thread (its event loop) spent on a CPU
    machine_idle: float  # share of the machine's CPU time that was idle


def wrk_round(pid: int, url: str, body: str, seconds: int, connections: int) -> Round:
    cpu, loop, (idle, ticks), started = cpu_seconds(pid), main_thread_seconds(pid), idle_ticks(), time.perf_counter()
    rate, count = wrk(url, body, seconds, connections)
    wall, (idle_after, ticks_after) = time.perf_counter() - started, idle_ticks()
    return Round(rate, (cpu_seconds(pid) - cpu) / count * 1e6, (main_thread_seconds(pid) - loop) / wall,
                 (idle_after - idle) / max(1, ticks_after - ticks))


def _histogram(base: str, name: str) -> tuple[float, float]:
    """(sum, count) of one of the server's histograms, from its /metrics."""
    metrics = httpx.get(f"{base}/metrics").text
    return tuple(float(re.search(rf"^{name}_{part} (\S+)", metrics, re.M).group(1)) for part in ("sum", "count"))


def mean_batch_rows(base: str) -> float:
    """Mean rows per model call so far, from the server's /metrics."""
    rows, calls = _histogram(base, "aeserve_batch_rows")
    return rows / calls


def model_call_totals(base: str) -> tuple[float, float]:
    """(seconds, calls) of the server's model calls so far, as its event loop timed them."""
    return _histogram(base, "aeserve_model_call_seconds")


@dataclass
class Turns:
    """Seconds per turn of one batch, posted and called in-process in turns."""

    rows: int
    http_seconds: list[float]
    local_seconds: list[float]

    def rates(self, first: int) -> tuple[float, float]:
        """(rows/s over HTTP, rows/s in-process): medians of the turns from the ``first`` (counted from 0) on."""
        return tuple(self.rows / float(np.median(seconds[first:])) for seconds in (self.http_seconds, self.local_seconds))


def npy_turns(post, batch: np.ndarray, local_call, turns: int = 11) -> Turns:
    """``post(batch)`` over HTTP and ``local_call(batch)`` in turns, so that both see the same machine."""
    http_seconds, local_seconds = [], []
    for _ in range(turns):
        t = time.perf_counter()
        post(batch)
        http_seconds.append(time.perf_counter() - t)
        t = time.perf_counter()
        local_call(batch)
        local_seconds.append(time.perf_counter() - t)
    return Turns(len(batch), http_seconds, local_seconds)


def plain_httpx_post(client: httpx.Client, url: str):
    """Posts a batch as one ``bytes`` body (np.save into a buffer), the way a caller without the Python client would."""
    def post(batch: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, batch)
        response = client.post(url, content=buffer.getvalue(), headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        assert response.status_code == 200, response.text
        np.load(io.BytesIO(response.content))
    return post


def python_client_latency(url: str, body: str, requests: int = 1000) -> tuple[float, float]:
    """(p50, p99) in milliseconds of sequential requests through httpx."""
    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(requests):
            t = time.perf_counter()
            response = client.post(url, content=body, headers={"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - t)
            assert response.status_code == 200, response.text
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def in_process_costs(version, small_engine, body: str, mean_batch: float) -> str:
    """What the service does per request beyond the ceiling app, timed in this process: parsing and the model
    (on ONNX Runtime, as the server runs small batches, when the version's graphs exported)."""
    import timeit

    from aeserve.service.codec import _rows_from_json, json_bytes
    from aeserve.service.operations import OPERATIONS

    encode = OPERATIONS["encode"].call
    run = small_engine.run if small_engine is not None else version.run
    encoded = body.encode()
    parse = min(timeit.repeat(lambda: _rows_from_json(encoded).astype(np.float32), number=1000, repeat=3)) / 1000
    batch = np.repeat(_rows_from_json(encoded).astype(np.float32), max(1, round(mean_batch)), axis=0)
    model = min(timeit.repeat(lambda: run(encode, batch), number=200, repeat=3)) / 200 / len(batch)
    code = version.encode(batch[:1])
    answer = min(timeit.repeat(lambda: json_bytes({"outputs": code}), number=1000, repeat=3)) / 1000
    return f"JSON parse {parse * 1e6:.0f} us, model {model * 1e6:.0f} us per row at batch {len(batch)}, answer {answer * 1e6:.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="(a): turns of ceiling then service")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve-args", default="", help="flags added to `aeserve serve`, e.g. '--no-access-log' (not the defaults)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the server and the in-process side of (b) run the model (cuda: torch only, no ONNX engine)")
    args = parser.parse_args()
    python = sys.executable
    port = 8765
    base = f"http://127.0.0.1:{port}"

    from aeserve.models.registry import Registry
    from aeserve.service.operations import OPERATIONS
    from aeserve.service.runtime.export import export_checked
    from aeserve.service.runtime.onnx import OnnxVersion
    from aeserve.service.runtime.torch_engine import TorchEngine

    version = Registry(args.registry).load(args.model, device=args.device)
    small_engine = None
    if args.device == "cpu":  # as the server runs small batches: on ONNX Runtime, when the graphs export
        graphs, _, refused = export_checked(version.folder)
        small_engine = None if refused else OnnxVersion(graphs, version.preprocessing, version.anomaly)
    serve_args = args.serve_args.split()
    engine_process = "--no-engine-process" not in serve_args and "torch" not in serve_args
    # The in-process side of (b): the call the server makes for a big batch (torch, every core, in blocks).
    engine, encode_call = TorchEngine(), OPERATIONS["encode"].call
    local_encode = lambda rows: engine.run(version, encode_call, rows)  # noqa: E731
    row = np.random.default_rng(0).random(version.preprocessing.input_dim).astype(np.float32) * 255
    body = '{"inputs": [[' + ",".join(f"{v:.1f}" for v in row) + "]]}"
    results: dict[str, str] = {}

    # (a) the ceiling of the HTTP stack and the service, both running, measured in turns with the same client and
    # settings: on a shared machine the speed drifts by tens of percent within minutes, so each round compares runs
    # seconds apart, and the median round is the result.
    have_wrk = shutil.which("wrk") is not None
    if not have_wrk:
        print("wrk not found: skipping (a)")
    ceiling_port = port + 1
    ceiling = start([python, "-m", "uvicorn", "benchmarks.ceiling_app:app", "--port", str(ceiling_port), "--no-access-log",
                     "--log-level", "warning"], ceiling_port)[0] if have_wrk else None
    server = None
    try:
        device = [] if args.device == "cpu" else ["--device", args.device]
        server, ready_seconds = start([python, "-m", "aeserve", "serve", "--registry", args.registry, "--port", str(port),
                                       *device, *serve_args], port)
        results["(e) start to ready"] = f"{ready_seconds:.2f} s"
        if args.device == "cpu":
            engine_seconds = ready_seconds + wait_for_engine(base, engine_process)
            where = "in the engine process" if engine_process else "on ONNX Runtime"
            results[f"(e') start to small batches {where}"] = f"{engine_seconds:.2f} s"
        results["(d) resident memory, model loaded"] = memory(server.pid)
        if have_wrk:
            rounds = []
            for _ in range(args.rounds):
                ceiling_round = wrk_round(ceiling.pid, f"http://127.0.0.1:{ceiling_port}/v1/models/m/encode", body,
                                          args.seconds, args.connections)
                service_round = wrk_round(server.pid, f"{base}/v1/models/{args.model}/encode", body, args.seconds,
                                          args.connections)
                rounds.append((service_round.rate / ceiling_round.rate, service_round, ceiling_round))
            rounds.sort(key=lambda r: r[0])
            ratio, service_round, ceiling_round = rounds[len(rounds) // 2]
            results["(a) single-row JSON encode, 32 connections"] = (
                f"{service_round.rate:.0f} req/s vs ceiling {ceiling_round.rate:.0f} req/s = {ratio:.2f} x (median of "
                f"{len(rounds)} rounds; all: {', '.join(f'{r[0]:.2f}' for r in rounds)})")
            mean_batch = mean_batch_rows(base)
            results["(a') server CPU per request under wrk"] = (
                f"service {service_round.cpu_us:.0f} us vs ceiling {ceiling_round.cpu_us:.0f} us; "
                f"mean batch {mean_batch:.1f} rows")
            results["(a') event loop thread on a CPU / machine idle, median round"] = (
                f"service {service_round.loop_busy:.0%} / {service_round.machine_idle:.0%}, "
                f"ceiling {ceiling_round.loop_busy:.0%} / {ceiling_round.machine_idle:.0%}")
        results["(d) resident memory after load test"] = memory(server.pid)

        # (c) one request at a time, timed by wrk on one connection: the server's latency over loopback. A Python
        # client adds its own cost, shown apart in (c'), with the ceiling app's figures beside both for scale.
        encode_url = f"{base}/v1/models/{args.model}/encode"
        ceiling_url = f"http://127.0.0.1:{ceiling_port}/v1/models/m/encode"
        if have_wrk:
            (p50, p99), (ceiling_p50, ceiling_p99) = (wrk_latency(url, body, args.seconds) for url in (encode_url, ceiling_url))
            results["(c) sequential single-row JSON encode latency (wrk, 1 connection)"] = (
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (ceiling app: p50 {ceiling_p50:.2f} ms, p99 {ceiling_p99:.2f} ms)")
        targets = {"service": encode_url, **({"ceiling app": ceiling_url} if have_wrk else {})}
        through_httpx = {who: python_client_latency(url, body) for who, url in targets.items()}
        results["(c') the same through a Python client (httpx)"] = ", ".join(
            f"{who}: p50 {p50:.2f} ms, p99 {p99:.2f} ms" for who, (p50, p99) in through_httpx.items())

        # (b) 10,000 rows per .npy request through the Python client (service/client.py) against the same call
        # in-process, in turns. The server's first big requests grow its heap: page faults in four posts after (a),
        # 15.6k, 11.7k, 6.2k and 6.2k, then none (RSS 450 -> 497 MB), so the result counts the turns after
        # WARM_TURNS, and the turns after the first are shown beside it.
        from aeserve.service.client import Client

        batch = np.random.default_rng(1).random((10_000, *version.input_shape)).astype(np.float32) * 255
        with Client(base, timeout=120) as client, httpx.Client(timeout=120) as plain:
            encode = lambda rows: client.encode(args.model, rows)  # noqa: E731
            warm = npy_turns(encode, batch, local_encode, turns=WARM_TURNS)
            seconds_before, calls_before = model_call_totals(base)
            counted = npy_turns(encode, batch, local_encode, turns=10)
            seconds_after, calls_after = model_call_totals(base)
            turns = Turns(len(batch), warm.http_seconds + counted.http_seconds, warm.local_seconds + counted.local_seconds)
            # Where a counted post's time went: the server's model calls (its /metrics) against the same call in-process.
            server_model_ms = (seconds_after - seconds_before) / (calls_after - calls_before) * 1000
            post_ms, local_ms = np.mean(counted.http_seconds) * 1000, np.mean(counted.local_seconds) * 1000
            # (b') the same with pixels as images store them (uint8), which the Python client sends as they are.
            pixels = np.random.default_rng(2).integers(0, 256, (10_000, *version.input_shape), dtype=np.uint8)
            pixel_turns = npy_turns(encode, pixels, local_encode, turns=WARM_TURNS + 10)
            # (b'') (b) again, posted as one bytes body by plain httpx: what the client's way of sending saves.
            plain_turns = npy_turns(plain_httpx_post(plain, encode_url), batch, local_encode, turns=WARM_TURNS + 10)
    finally:
        if server is not None:
            stop(server)
        if ceiling is not None:
            stop(ceiling)
    if have_wrk:
        results["(a'') in-process costs per single-row request"] = in_process_costs(version, small_engine, body, mean_batch)
    (http_rows, local_rows), (early_http, early_local) = turns.rates(WARM_TURNS), turns.rates(1)
    results["(b) .npy encode, 10,000 rows per request"] = (
        f"{http_rows:.0f} rows/s vs in-process {local_rows:.0f} rows/s = {http_rows / local_rows:.2f} x (medians of turns "
        f"{WARM_TURNS + 1}-{WARM_TURNS + 10} each; of turns 2-{WARM_TURNS + 10}: {early_http / early_local:.2f} x)")
    results["(b) where a counted post's time went (means)"] = (
        f"post {post_ms:.0f} ms = model call in the server {server_model_ms:.0f} ms (in-process {local_ms:.0f} ms) "
        f"+ {post_ms - server_model_ms:.0f} ms of HTTP, reading, parsing and the client")
    for key, other in (("(b') the same with uint8 pixels on the wire (a quarter of the body)", pixel_turns),
                       ("(b'') (b) posted by plain httpx as one bytes body", plain_turns)):
        other_http, other_local = other.rates(WARM_TURNS)
        results[key] = f"{other_http:.0f} rows/s vs in-process {other_local:.0f} rows/s = {other_http / other_local:.2f} x"

    print(f"\nmodel {args.model}:{version.version} ({version.manifest['kind']}, code {version.code_dim}), "
          f"{os.cpu_count()} CPUs, model on {args.device}, aeserve serve {' '.join(serve_args) or 'at its defaults'}\n")
    print("| measure | result |\n|---|---|")
    for key in sorted(results):
        print(f"| {key} | {results[key]} |")


if __name__ == "__main__":
    main()
