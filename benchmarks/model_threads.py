"""Model call time by batch size: torch on one thread and on all of them, and ONNX Runtime on one thread.

Where ONE_THREAD_ROWS splits torch's threads (service/runtime/torch_engine.py), and where small batches leave torch for
ONNX Runtime (SMALL_BATCH_ROWS, service/runtime/engines.py). With --blocks, the time of one big call by the size of the
blocks torch runs it in (CPU_BLOCK_ROWS, in torch_engine.py).

    .venv/bin/python -m benchmarks.model_threads --registry registry --model fmnist-mlp30
    .venv/bin/python -m benchmarks.model_threads --registry registry --model fmnist-mlp30 --blocks
"""
from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np
import torch

from aeserve.models.registry import Registry
from aeserve.models.version import ModelVersion
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime import torch_engine
from aeserve.service.runtime.export import GraphExport
from aeserve.service.runtime.onnx import OnnxVersion


def seconds_per_call(fn, x: np.ndarray, budget: float = 0.5) -> float:
    for _ in range(5):
        fn(x)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget:
        fn(x)
        calls += 1
    return (time.perf_counter() - started) / calls


def onnx_version(version: ModelVersion) -> OnnxVersion:
    """``version`` on ONNX Runtime, its graphs exported and checked against torch as the server does."""
    graphs: dict[str, bytes] = {}
    GraphExport([version.folder]).collect([version], lambda _, exported: graphs.update(exported))
    if not graphs:
        raise SystemExit("the ONNX export failed; see the log")
    return OnnxVersion(graphs, version.preprocessing, version.anomaly)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--batches", default="1,4,16,32,64,256,10000")
    parser.add_argument("--blocks", action="store_true", help="instead: a 10,000-row call by block size")
    args = parser.parse_args()
    version = Registry(args.registry).load(args.model)
    if args.blocks:
        return by_block_size(version)
    onnx = onnx_version(version)
    encode = OPERATIONS["encode"].call
    # torch as the server runs it (in blocks of CPU_BLOCK_ROWS rows), but on the threads each column asks for
    runner = torch_engine.TorchEngine()
    torch_engine.ONE_THREAD_ROWS = 0
    most = torch.get_num_threads()
    print(f"model {args.model}:{version.version}, encode, {os.cpu_count()} CPUs, microseconds per row\n")
    print(f"| rows | torch, 1 thread | torch, {most} threads | ONNX Runtime, 1 thread |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for rows in (int(b) for b in args.batches.split(",")):
        x = (rng.random((rows, *version.input_shape)) * 255).astype(np.float32)
        times = []
        for threads in (1, most):
            runner.threads = threads
            times.append(seconds_per_call(partial(runner.run, version, encode), x))
        times.append(seconds_per_call(partial(onnx.run, encode), x))
        print(f"| {rows} | " + " | ".join(f"{t / rows * 1e6:.1f}" for t in times) + " |")


def by_block_size(version: ModelVersion, rows: int = 10_000, rounds: int = 7) -> None:
    """Milliseconds per call of ``rows`` rows on all threads, by block size; the block sizes take turns each round."""
    x = (np.random.default_rng(0).random((rows, *version.input_shape)) * 255).astype(np.float32)
    sizes = [rows, 4096, 2048, 1024, 512, 256]
    runner = torch_engine.TorchEngine()
    print(f"model {version.name}:{version.version}, {rows} rows per call, {runner.threads} threads, "
          f"milliseconds per call (median of {rounds} rounds)\n")
    print("| operation | " + " | ".join("one call" if size == rows else f"blocks of {size}" for size in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for operation in ("encode", "reconstruct"):
        call = OPERATIONS[operation].call
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size in sizes:
                torch_engine.CPU_BLOCK_ROWS = size
                times[size].append(seconds_per_call(partial(runner.run, version, call), x, budget=1.0))
        print(f"| {operation} | " + " | ".join(f"{np.median(times[size]) * 1e3:.0f}" for size in sizes) + " |")


if __name__ == "__main__":
    main()
