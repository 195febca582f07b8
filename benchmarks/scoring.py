"""The anomaly score's neighbour search against the model call it follows, at 1 and 10,000 rows.

For each version: the model call that reconstruct makes without a score (reconstruction and error, on torch as the
server's torch engine runs it: one thread under 64 rows, every core in blocks of 1,024 above) and the exact search
over reference sets of several sizes (models/anomaly.py, on the version's own codes), each the best of a few repeats.
The reference size (anomaly.reference_rows) is chosen from this table: docs/benchmarks.md, "Anomaly scores".

    .venv/bin/python -m benchmarks.neighbors --registry /tmp/reg --model fmnist-mlp30 bc
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aeserve.models.anomaly import Neighbors
from aeserve.models.outputs import Call
from aeserve.models.registry import Registry
from aeserve.service.runtime.torch_engine import TorchEngine

MODEL_CALL = Call("inputs", ("reconstruction", "error"))
ROWS = (1, 10_000)
REFERENCE_ROWS = (500, 1000, 2000, 5000, 20_000)


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--reference-rows", type=int, nargs="+", default=list(REFERENCE_ROWS))
    args = parser.parse_args()
    registry, engine, rng = Registry(args.registry), TorchEngine(), np.random.default_rng(0)
    print("| model | rows | model call (ms) | " + " | ".join(f"search, {m:,} reference rows (ms)" for m in args.reference_rows) + " |")
    print("|---|---|---|" + "---|" * len(args.reference_rows))
    for name in args.model:
        version = registry.load(name)
        pre = version.preprocessing
        x = (pre.offset + rng.random((max(ROWS), pre.input_dim)) / pre.scale).astype(np.float32)  # the training data's range
        codes = version.encode(x)
        for n in ROWS:
            repeats = 200 if n == 1 else 5
            model = best_seconds(lambda: engine.run(version, MODEL_CALL, x[:n]), repeats)  # noqa: B023
            searches = []
            for m in args.reference_rows:
                reference = np.resize(codes, (m, version.code_dim))  # the timing depends on the sizes alone
                neighbors = Neighbors.fit(reference, k=5, reference_rows=m, seed=0)
                searches.append(best_seconds(lambda: neighbors.scores(codes[:n]), repeats))  # noqa: B023
            print(f"| {name} ({version.manifest['kind']} {pre.input_dim}-{version.code_dim}) | {n:,} | {model * 1e3:.3f} | "
                  + " | ".join(f"{s * 1e3:.3f}" for s in searches) + " |")
    print(f"\ntorch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
