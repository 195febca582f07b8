"""CPU time of one small model call back to back, and after the calling thread has slept between calls.

A server's model thread sleeps between batches. On a shared VM its caches are cold when it wakes, and a call costs
more CPU than the same call in a loop; this measures by how much, with nothing else running and beside a process
that streams through 64 MB of memory.

    .venv/bin/python -m benchmarks.cold_calls --registry registry --model fmnist-mlp30
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial

import numpy as np

from aeserve.models.registry import Registry
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime.export import GraphExport
from aeserve.service.runtime.onnx import OnnxVersion

MEMORY_HOG = "import numpy as np\nb = np.ones(16 << 20, np.float32)\nwhile True: b *= 1.0000001"


def cpu_per_call(call, gap_s: float, calls: int = 200) -> float:
    """Median CPU microseconds of ``call()`` in this thread, sleeping ``gap_s`` before each."""
    for _ in range(10):
        call()
    spent = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        started = time.thread_time()
        call()
        spent.append(time.thread_time() - started)
    return float(np.median(spent)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry")
    parser.add_argument("--model", default="fmnist-mlp30")
    args = parser.parse_args()
    version = Registry(args.registry).load(args.model)
    graphs: dict[str, bytes] = {}  # exported and checked against torch as the server does
    GraphExport([version.folder]).collect([version], lambda _, exported: graphs.update(exported))
    if not graphs:
        raise SystemExit("the ONNX export failed; see the log")
    onnx = OnnxVersion(graphs, version.preprocessing, version.anomaly)
    encode = OPERATIONS["encode"].call
    gaps = (0.0, 0.0005, 0.003)
    print(f"model {args.model}:{version.version}, encode on ONNX Runtime (one thread), CPU microseconds per call "
          f"(median of 200)\n")
    print("| rows | beside | " + " | ".join("back to back" if gap == 0 else f"{gap * 1e3:g} ms asleep before each" for gap in gaps)
          + " |\n|---|---|" + "---|" * len(gaps))
    rng = np.random.default_rng(0)
    for rows in (1, 16):
        x = (rng.random((rows, *version.input_shape)) * 255).astype(np.float32)
        for beside in ("nothing", "a process streaming through 64 MB"):
            hog = subprocess.Popen([sys.executable, "-c", MEMORY_HOG]) if beside != "nothing" else None
            try:
                time.sleep(0.5 if hog else 0)
                cells = [cpu_per_call(partial(onnx.run, encode, x), gap) for gap in gaps]
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
            print(f"| {rows} | {beside} | " + " | ".join(f"{cell:.0f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
