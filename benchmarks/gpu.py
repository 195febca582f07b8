"""GPU serving: every version in a registry gives the CPU's answers on the GPU, in-process and over HTTP; then speed.

    python -m benchmarks.gpu --registry registry --model fmnist-mlp30 [--device cuda] [--json out.json]

(from the repository root, which makes ``benchmarks`` importable.)

1. Agreement, in-process: each model's latest version is loaded on the CPU and on --device; encode, decode, reconstruct and project on
   fresh random inputs of 1, 7 and 300 rows are compared by relative error ||device - cpu|| / ||cpu||.
2. Agreement, served: `aeserve serve --device DEVICE` on 127.0.0.1; the Python client calls those four operations of
   every model (.npy), encode also as JSON; each answer must match the CPU's and name the model and version.
3. Speed, for --model: in-process encode at 1 to 10,000 rows on the CPU and on the device, on torch as the server
   runs it (the first call after the server's warm-up, then the median); a 10,000-row .npy encode over HTTP against
   the same call in-process; single-row JSON encode one at a time and at 32 concurrent connections; the server's
   memory.

--device cpu runs every step on the CPU: a dry run of the script where there is no GPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch

from aeserve.models.registry import Registry
from aeserve.models.version import ModelVersion
from aeserve.service.client import Client
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime.store import warmed
from aeserve.service.runtime.torch_engine import TorchEngine
from benchmarks.loadgen import Request, closed_loop, rss_mb
from benchmarks.serve import mean_batch_rows, npy_turns, start, stop

BATCHES = (1, 32, 256, 10_000)


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30))


def raw_inputs(version: ModelVersion, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random inputs spanning the raw range the model was trained on (model space [0, 1])."""
    p = version.preprocessing
    return (rng.random((rows, *version.input_shape)) / p.scale + p.offset).astype(np.float32)


def answers(version: ModelVersion, x: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    x_hat, errors, percentiles = version.reconstruct(x)
    return {"encode": version.encode(x), "decode": version.decode(codes), "reconstruct": x_hat, "errors": errors,
            "percentiles": percentiles, "project": version.project(x)}


def agreement(registry: Registry, device: str, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """{model: {operation: worst relative error over the batch sizes}}."""
    worst: dict[str, dict[str, float]] = {}
    for name in registry.names():
        cpu, other = registry.load(name, device="cpu"), registry.load(name, device=device)
        for rows in (1, 7, 300):
            x = raw_inputs(cpu, rows, rng)
            codes = rng.standard_normal((rows, cpu.code_dim)).astype(np.float32)
            expected, got = answers(cpu, x, codes), answers(other, x, codes)
            for op in expected:
                error = relative_error(got[op], expected[op])
                worst.setdefault(name, {})[op] = max(worst.get(name, {}).get(op, 0.0), error)
    return worst


def served_agreement(registry: Registry, base: str, rng: np.random.Generator) -> dict[str, float]:
    """{model: worst relative error of the served answers against the CPU in-process}; raises on a wrong name or version."""
    worst = {}
    with Client(base, timeout=120) as client:
        for name in registry.names():
            cpu = registry.load(name, device="cpu")
            x = raw_inputs(cpu, 64, rng)
            codes = rng.standard_normal((64, cpu.code_dim)).astype(np.float32)
            expected = answers(cpu, x, codes)
            served = {"encode": client.encode(name, x), "decode": client.decode(name, codes),
                      "reconstruct": client.reconstruct(name, x), "project": client.project(name, x)}
            for op, result in served.items():
                if (result.model, result.version) != (name, str(cpu.version)):
                    raise AssertionError(f"{op} of {name} answered as {result.model}:{result.version}, expected version {cpu.version}")
            response = httpx.post(f"{base}/v1/models/{name}/encode", json={"inputs": x.tolist()}, timeout=120)
            response.raise_for_status()
            errors = [relative_error(result.outputs, expected[op]) for op, result in served.items()]
            errors += [relative_error(served["reconstruct"].errors, expected["errors"]),
                       relative_error(np.asarray(response.json()["outputs"], np.float32), expected["encode"])]
            worst[name] = max(errors)
    return worst


def timed(call, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ``repeats``)."""
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t)
    return first, float(np.median(seconds))


def on_torch(version: ModelVersion, operation: str) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """``operation`` on torch as the server runs it (``TorchEngine``: one thread under ONE_THREAD_ROWS rows, on the
    CPU in blocks of CPU_BLOCK_ROWS rows), here on the calling thread."""
    engine, call = TorchEngine(), OPERATIONS[operation].call
    return lambda x: engine.run(version, call, x)


def in_process_speed(registry: Registry, name: str, device: str, rng: np.random.Generator) -> dict[str, dict[str, tuple[float, float]]]:
    """{device: {call: (first call, median)}}: encode of each batch size, then a 10,000-row reconstruct, each version
    loaded and warmed as the server does."""
    speed = {}
    for where in dict.fromkeys(("cpu", device)):
        version = warmed(registry.load(name, device=where))
        encode, reconstruct = on_torch(version, "encode"), on_torch(version, "reconstruct")
        calls = {f"encode {rows:,}": (encode, rows) for rows in BATCHES} | {"reconstruct 10,000": (reconstruct, 10_000)}
        speed[where] = {call: timed(lambda f=f, x=raw_inputs(version, rows, rng): f(x), 20 if rows >= 10_000 else 200)
                        for call, (f, rows) in calls.items()}
    return speed


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory process ``pid`` holds, from nvidia-smi; None where there is none to ask."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = [float(memory) for line in out.splitlines() if "," in line for p, memory in [line.split(",")] if int(p) == pid]
    return used[0] if used else None


def served_speed(version: ModelVersion, base: str, name: str, rng: np.random.Generator) -> dict[str, float]:
    with Client(base, timeout=120) as client:
        post = lambda rows: client.encode(name, rows)  # noqa: E731
        http_rows, local_rows = npy_turns(post, raw_inputs(version, 10_000, rng), on_torch(version, "encode")).rates(1)
    row = raw_inputs(version, 1, rng)[0].reshape(-1)
    single = Request(f"/v1/models/{name}/encode", json.dumps({"inputs": [row.tolist()]}).encode(), "application/json", "application/json")
    one = asyncio.run(closed_loop(base, single, 3.0, 1))
    many = asyncio.run(closed_loop(base, single, 5.0, 32))
    for outcome in (one, many):
        if outcome.ok != sum(outcome.statuses.values()):
            raise AssertionError(f"error answers under load: {dict(outcome.statuses)}")
    p50, p99 = np.percentile(np.array(one.latencies) * 1000, [50, 99])
    return {"npy_http_rows_per_s": http_rows, "npy_local_rows_per_s": local_rows,
            "single_p50_ms": float(p50), "single_p99_ms": float(p99),
            "concurrent_req_per_s": many.ok / many.seconds, "mean_batch_rows": mean_batch_rows(base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30", help="the model timed in step 3")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--port", type=int, default=8775)
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--in-process-only", action="store_true", help="only the in-process timings of step 3, printed as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run")
    registry, rng = Registry(args.registry), np.random.default_rng(0)
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    report: dict = {"device": where, "torch": torch.__version__, "cpus": os.cpu_count(), "cpu_threads": torch.get_num_threads()}

    if args.in_process_only:
        report["in_process_s"] = in_process_speed(registry, args.model, args.device, rng)
        print(json.dumps(report["in_process_s"]))
        return
    report["agreement"] = agreement(registry, args.device, rng)
    base = f"http://127.0.0.1:{args.port}"
    server, ready = start([sys.executable, "-m", "aeserve", "serve", "--registry", args.registry, "--device", args.device,
                           "--port", str(args.port), "--poll-seconds", "0", "--no-access-log"], args.port)
    try:
        report["start_to_ready_s"] = ready
        report["served_agreement"] = served_agreement(registry, base, rng)
        report["in_process_s"] = in_process_speed(registry, args.model, args.device, rng)
        report["served"] = served_speed(registry.load(args.model, device=args.device), base, args.model, rng)
        report["server_rss_mb"] = rss_mb(server.pid)
        report["server_gpu_mb"] = gpu_memory_mb(server.pid)
    finally:
        stop(server)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(report, args)


def print_report(report: dict, args: argparse.Namespace) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['cpus']} CPUs (torch uses {report['cpu_threads']} threads)\n")
    print(f"| model | worst relative error {args.device} vs cpu, in-process: encode / decode / reconstruct / errors / "
          f"percentiles / project | served |\n|---|---|---|")
    for name, errors in report["agreement"].items():
        print(f"| {name} | {' / '.join(f'{e:.1e}' for e in errors.values())} | {report['served_agreement'][name]:.1e} |")
    speeds = report["in_process_s"]
    print(f"\n{args.model} in-process, first call after warm-up / median:\n\n| call, rows | " + " | ".join(speeds)
          + " |\n|---|" + "---|" * len(speeds))
    for call in next(iter(speeds.values())):
        cells = [f"{speed[call][0] * 1e3:.2f} / {speed[call][1] * 1e3:.3f} ms" for speed in speeds.values()]
        print(f"| {call} | {' | '.join(cells)} |")
    served = report["served"]
    gpu_mb = report["server_gpu_mb"]
    print(f"\n| served on {args.device} | result |\n|---|---|")
    print(f"| start to ready | {report['start_to_ready_s']:.2f} s |")
    print(f"| .npy encode, 10,000 rows | {served['npy_http_rows_per_s']:,.0f} rows/s vs in-process "
          f"{served['npy_local_rows_per_s']:,.0f} = {served['npy_http_rows_per_s'] / served['npy_local_rows_per_s']:.2f} x |")
    print(f"| single-row JSON encode, one at a time | p50 {served['single_p50_ms']:.2f} ms, p99 {served['single_p99_ms']:.2f} ms |")
    print(f"| single-row JSON encode, 32 connections | {served['concurrent_req_per_s']:,.0f} req/s, "
          f"mean batch {served['mean_batch_rows']:.1f} rows |")
    print(f"| server memory | {report['server_rss_mb']:.0f} MB resident"
          + (f", {gpu_mb:.0f} MB on the GPU |" if gpu_mb is not None else " |"))


if __name__ == "__main__":
    main()
