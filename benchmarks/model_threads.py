"""Model call time by batch size: torch on one thread and on all of them, and the ONNX Runtime engine on one thread.

Where IntraOpThreads splits torch's threads, and where small batches leave torch for the engine (SMALL_BATCH_ROWS).
With --blocks, the time of one big call by the size of the blocks torch runs it in (CPU_BLOCK_ROWS).

    .venv/bin/python benchmarks/model_threads.py --registry registry --model fmnist-mlp30
    .venv/bin/python benchmarks/model_threads.py --registry registry --model fmnist-mlp30 --blocks
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from aeserve.models import checkpoint  # noqa: E402
from aeserve.models.onnx_engine import EngineExport  # noqa: E402
from aeserve.models.registry import Registry  # noqa: E402


def seconds_per_call(fn, x: np.ndarray, budget: float = 0.5) -> float:
    for _ in range(5):
        fn(x)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget:
        fn(x)
        calls += 1
    return (time.perf_counter() - started) / calls


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
    EngineExport([version.folder]).attach([version])
    if version.engine is None:
        raise SystemExit("the ONNX export failed; see the log")
    most = torch.get_num_threads()
    print(f"model {args.model}:{version.version}, encode, {os.cpu_count()} CPUs, microseconds per row\n")
    print(f"| rows | torch, 1 thread | torch, {most} threads | ONNX Runtime, 1 thread |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for rows in (int(b) for b in args.batches.split(",")):
        x = (rng.random((rows, *version.input_shape)) * 255).astype(np.float32)
        times = []
        for threads in (1, most):
            torch.set_num_threads(threads)
            times.append(seconds_per_call(version._encode_torch, x))
        times.append(seconds_per_call(lambda x: version.engine.run("encode", version.preprocessing.to_model(x)), x))
        print(f"| {rows} | " + " | ".join(f"{t / rows * 1e6:.1f}" for t in times) + " |")


def by_block_size(version, rows: int = 10_000, rounds: int = 7) -> None:
    """Milliseconds per call of ``rows`` rows on all threads, by block size; the block sizes take turns each round."""
    x = (np.random.default_rng(0).random((rows, *version.input_shape)) * 255).astype(np.float32)
    sizes = [rows, 4096, 2048, 1024, 512, 256]
    print(f"model {version.name}:{version.version}, {rows} rows per call, {torch.get_num_threads()} threads, "
          f"milliseconds per call (median of {rounds} rounds)\n")
    print("| operation | " + " | ".join("one call" if size == rows else f"blocks of {size}" for size in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for operation in ("encode", "reconstruct"):
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size in sizes:
                checkpoint.CPU_BLOCK_ROWS = size
                times[size].append(seconds_per_call(getattr(version, f"_{operation}_torch"), x, budget=1.0))
        print(f"| {operation} | " + " | ".join(f"{np.median(times[size]) * 1e3:.0f}" for size in sizes) + " |")


if __name__ == "__main__":
    main()
