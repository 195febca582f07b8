"""Overload benchmark: measure capacity, send twice that open-loop, watch health and memory, check recovery.

    .venv/bin/python -m benchmarks.overload --registry registry --model fmnist-mlp30 [--seconds 60] [--rows 64]

1. Capacity: closed-loop clients send `reconstruct` requests of --rows rows (.npy) for a few seconds.
2. Overload: an open-loop generator sends --factor x that rate for --seconds while a probe
   calls /health/ready every 100 ms and the server's resident memory is sampled every second.
   Every answer must be 2xx or 503 (with Retry-After); nothing else, no dropped connections.
3. Recovery: once the load stops, the queue drains and a second closed-loop run must reach the
   capacity of step 1 again.
A long --seconds run is the soak: memory in its second half must not grow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.loadgen import npy_request, overload_run  # noqa: E402
from benchmarks.serve import start, stop, wait_for_engine  # noqa: E402


def ms(values: list[float], q: float) -> str:
    return f"{np.percentile(np.array(values) * 1000, q):.1f} ms" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--rows", type=int, default=64, help="rows per request")
    parser.add_argument("--seconds", type=float, default=60, help="length of the overload phase")
    parser.add_argument("--factor", type=float, default=2.0, help="open-loop rate as a multiple of measured capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    port = 8766
    base = f"http://127.0.0.1:{port}"

    from aeserve.models.registry import Registry

    version = Registry(args.registry).load(args.model)
    rows = (np.random.default_rng(0).random((args.rows, *version.input_shape)) * 255).astype(np.float32)
    request = npy_request(f"/v1/models/{args.model}/reconstruct", rows)

    server, _ = start([sys.executable, "-m", "aeserve", "serve", "--registry", args.registry, "--port", str(port),
                       "--models", args.model, "--poll-seconds", "0", "--no-access-log"], port)
    try:
        # Ready comes before the ONNX export is done: wait for it, or the export child's CPU and memory count too.
        wait_for_engine(base, engine_process=True)
        run = overload_run(base, request, server.pid, args.factor, args.seconds, args.capacity_seconds, args.concurrency, warmup_seconds=2)
    finally:
        stop(server)

    before, load, health, after, capacity = run.before, run.load, run.health, run.after, run.capacity
    rate = args.factor * capacity
    times, rss = np.array(run.memory).T
    second_half = times >= times[-1] / 2
    slope = np.polyfit(times[second_half], rss[second_half], 1)[0] * 60 if second_half.sum() > 2 else float("nan")
    unexpected = load.unexpected({503})
    rows_out = {
        "capacity (closed loop, before)": f"{capacity:.0f} req/s ({capacity * args.rows:.0f} rows/s), p50 {ms(before.latencies, 50)}",
        "open-loop rate sent": f"{load.sent / load.seconds:.0f} req/s for {load.seconds:.0f} s (target {rate:.0f}, {args.factor} x capacity)",
        "answers during overload": ", ".join(f"{status}: {count}" for status, count in sorted(load.statuses.items(), key=str)),
        "answers other than 2xx / 503": str(unexpected or "none"),
        "stale keep-alive connections, request resent": str(load.retried),
        "2xx latency during overload": f"p50 {ms(load.latencies, 50)}, p99 {ms(load.latencies, 99)}",
        "/health/ready during overload": (f"{health.sent} probes, statuses {dict(health.statuses)}, "
                                          f"p50 {ms(health.latencies, 50)}, p99 {ms(health.latencies, 99)}, max {ms(health.latencies, 100)}"),
        "resident memory": (f"{run.rss_before:.0f} MB before, peak {rss.max():.0f} MB, {run.rss_after:.0f} MB after; "
                            f"second-half slope {slope:+.1f} MB/min"),
        "recovery": f"queue empty {run.drain_seconds:.1f} s after the load; capacity after {after.ok / after.seconds:.0f} req/s "
                    f"({after.ok / after.seconds / capacity:.2f} x before), non-2xx {after.unexpected(set()) or 'none'}",
    }
    print(f"\nmodel {args.model}:{version.version}, reconstruct of {args.rows} rows per .npy request\n")
    print("| measure | result |\n|---|---|")
    for key, value in rows_out.items():
        print(f"| {key} | {value} |")
    if unexpected:
        sys.exit(1)


if __name__ == "__main__":
    main()
