"""The slim server (no torch: stored ONNX graphs on ONNX Runtime) against the full server, side by side.

    .venv/bin/python -m benchmarks.slim --registry registry --model fmnist-mlp30 [--slim-python /path/to/slim-venv/bin/python]

Both run ``aeserve serve`` with every setting at its default. The slim server is ``--slim-python``'s (a virtual
environment with only the ``serve`` extra installed), or else this interpreter with torch and the training stack made
unimportable (a ``sitecustomize`` in a temporary folder on PYTHONPATH), which serves exactly as the slim install does.
The version must have been published with its graphs (the manifest's ``graphs.files``).

Measures, alternating the two servers turn by turn so that a noisy machine hits both alike:
- start to ready (the process started until ``/health/ready`` answers 200), ``--starts`` times each;
- a 10,000-row ``.npy`` encode (float32, the model's input shape), ``--turns`` posts each after ``WARM_TURNS``;
- single-row JSON encode latency, one request at a time, ``--requests`` each.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import wait_ready
from benchmarks.serve import stop
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "sklearn", "matplotlib", "openTSNE", "onnxscript", "onnx", "pyarrow", "scipy")
WARM_TURNS = 4


def commands(registry: str, slim_python: str | None, blocker: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (the command without its port, extra environment)."""
    serve = ["-m", "aeserve", "serve", "--registry", registry, "--no-access-log", "--drain-grace-seconds", "0"]
    env = {"PYTHONPATH": str(blocker)} if slim_python is None else {}
    return {"full": ([sys.executable, *serve], {}), "slim": ([slim_python or sys.executable, *serve], env)}


def start(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url, time.perf_counter() - started


def npy(rows: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, rows)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--slim-python", help="a slim virtual environment's python (default: this one, torch blocked)")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="aeserve-slim-") as folder:
        blocker = Path(folder)
        (blocker / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
        servers = commands(args.registry, args.slim_python, blocker)
        ready: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.starts):
            for name, (command, env) in servers.items():
                process, _, seconds = start(command, env)
                ready[name].append(seconds)
                stop(process)
        running = {name: start(command, env) for name, (command, env) in servers.items()}
        try:
            results = measure({name: url for name, (_, url, _) in running.items()}, args)
        finally:
            for process, _, _ in running.values():
                stop(process)
    print(f"model {args.model}; slim server: {args.slim_python or 'this interpreter, torch and the training stack blocked'}")
    print("| | full server | slim server | slim / full |")
    print("|---|---|---|---|")
    full_ready, slim_ready = statistics.median(ready["full"]), statistics.median(ready["slim"])
    print(f"| start to ready, median of {args.starts} (s) | {full_ready:.2f} | {slim_ready:.2f} | {slim_ready / full_ready:.2f} |")
    for label, (full, slim) in results.items():
        print(f"| {label} | {full:.2f} | {slim:.2f} | {slim / full:.2f} |")


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    with httpx.Client(timeout=120) as client:
        shape = client.get(f"{urls['full']}/v1/models/{args.model}").json()["input_shape"]
        rng = np.random.default_rng(0)
        bulk = npy(rng.random((10_000, *shape), dtype=np.float32))
        one = {"inputs": [rng.random(shape).tolist()]}
        bulk_ms: dict[str, list[float]] = {name: [] for name in urls}
        for turn in range(WARM_TURNS + args.turns):
            for name, url in urls.items():
                started = time.perf_counter()
                response = client.post(f"{url}/v1/models/{args.model}/encode", content=bulk,
                                       headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if turn >= WARM_TURNS:
                    bulk_ms[name].append(elapsed)
        single_ms: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(args.requests):
            for name, url in urls.items():
                started = time.perf_counter()
                client.post(f"{url}/v1/models/{args.model}/encode", json=one).raise_for_status()
                single_ms[name].append((time.perf_counter() - started) * 1000)
    rows_per_s = {name: 10_000 / (statistics.median(ms) / 1000) for name, ms in bulk_ms.items()}
    return {
        f"10,000-row .npy encode, median of {args.turns} (ms)": (statistics.median(bulk_ms["full"]), statistics.median(bulk_ms["slim"])),
        "10,000-row .npy encode (rows/s, thousands)": (rows_per_s["full"] / 1000, rows_per_s["slim"] / 1000),
        f"single-row JSON encode p50, {args.requests} requests (ms)": tuple(float(np.percentile(single_ms[n], 50)) for n in ("full", "slim")),
        "single-row JSON encode p99 (ms)": tuple(float(np.percentile(single_ms[n], 99)) for n in ("full", "slim")),
    }


if __name__ == "__main__":
    main()
