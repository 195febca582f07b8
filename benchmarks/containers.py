"""The full and the slim image side by side, each serving one registry from its container: image size, start to ready,
single-row and bulk (10,000-row .npy) encode throughput.

    .venv/bin/python -m benchmarks.containers --registry REGISTRY --model NAME [--full IMAGE] [--slim IMAGE]

The images default to the tags .ci/container builds (it also sets CONTAINERS_CONF; export it the same way:
CONTAINERS_CONF=deploy/container/containers.conf). Each container runs as the images do in CI and Kubernetes: uid
10001, a read-only root filesystem, REGISTRY mounted read-only at /registry, every setting at the image's default; its
port is forwarded to loopback by podman, which is in every request's path as it is for any user of the image. The
version must have been published with its ONNX graphs (this release's trainer stores them), or the slim image answers
503 for it.

Measured alternating the images turn by turn, so that a noisy machine hits both alike:
- start to ready: ``podman run`` (the container's creation included) until ``/health/ready`` answers 200, ``--starts``
  times each;
- single-row JSON encode, closed loop (``--connections`` clients that each send again on an answer; benchmarks/loadgen.py),
  ``--rounds`` rounds of ``--seconds`` each: answers per second;
- the 10,000-row ``.npy`` encode and one-request-at-a-time latency, as benchmarks/slim.py measures the two servers
  outside containers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import Request, closed_loop
from benchmarks.slim import measure
from tests.containers import Container, image_size_mb

RUN_ARGS = ("--read-only", "--user", "10001", "--cap-drop", "ALL")


def single_row_rate(urls: dict[str, str], path: str, row: list, rounds: int, seconds: float, connections: int) -> dict[str, float]:
    """Median over ``rounds`` of each server's 2xx answers per second to one-row JSON encodes, rounds alternating."""
    request = Request(path, json.dumps({"inputs": [row]}).encode(), "application/json", accept="application/json")
    rates: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            outcome = asyncio.run(closed_loop(url, request, seconds, connections))
            if outcome.unexpected(set()):
                raise RuntimeError(f"{name}: {outcome.unexpected(set())}")
            rates[name].append(outcome.ok / outcome.seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--full", default="localhost/aeserve:ci")
    parser.add_argument("--slim", default="localhost/aeserve-serve:ci")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--turns", type=int, default=12, help="10,000-row posts each, after benchmarks/slim.py's warm-up turns")
    parser.add_argument("--requests", type=int, default=500, help="one-at-a-time single-row requests each")
    args = parser.parse_args()
    images = {"full": args.full, "slim": args.slim}
    run_args = (*RUN_ARGS, "-v", f"{args.registry.resolve()}:/registry:ro")

    ready: dict[str, list[float]] = {name: [] for name in images}
    for _ in range(args.starts):
        for name, image in images.items():
            with Container(image, *run_args) as container:
                ready[name].append(container.start())

    with Container(images["full"], *run_args) as full, Container(images["slim"], *run_args) as slim:
        full.start()
        slim.start()
        urls = {"full": full.url, "slim": slim.url}
        shape = httpx.get(f"{full.url}/v1/models/{args.model}").json()["input_shape"]
        row = np.random.default_rng(1).random(shape).tolist()
        rates = single_row_rate(urls, f"/v1/models/{args.model}/encode", row, args.rounds, args.seconds, args.connections)
        results = measure(urls, args)

    print(f"model {args.model}; images {args.full} and {args.slim}")
    print("| | full image | slim image | slim / full |")
    print("|---|---|---|---|")
    sizes = {name: image_size_mb(image) for name, image in images.items()}
    print(f"| image size (MB, uncompressed) | {sizes['full']:.0f} | {sizes['slim']:.0f} | {sizes['slim'] / sizes['full']:.2f} |")
    full_ready, slim_ready = statistics.median(ready["full"]), statistics.median(ready["slim"])
    print(f"| start to ready in the container, median of {args.starts} (s) | {full_ready:.2f} | {slim_ready:.2f} | {slim_ready / full_ready:.2f} |")
    print(f"| single-row JSON encode, {args.connections} connections, median of {args.rounds} x {args.seconds:.0f} s (answers/s) "
          f"| {rates['full']:.0f} | {rates['slim']:.0f} | {rates['slim'] / rates['full']:.2f} |")
    for label, (full_value, slim_value) in results.items():
        print(f"| {label} | {full_value:.2f} | {slim_value:.2f} | {slim_value / full_value:.2f} |")


if __name__ == "__main__":
    main()
