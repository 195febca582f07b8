"""The torch engine: a version's calls on torch (``ModelVersion.run``, models/version.py), on the model threads.

Beside it the ONNX Runtime engine (``onnx.py``); ``engines.py`` decides which one takes a call.
"""
from __future__ import annotations

import numpy as np
import torch

from aeserve.models.outputs import Call
from aeserve.models.version import ModelVersion

Outputs = tuple[np.ndarray, ...]

# torch calls under this many rows run on one thread: a second thread slows a small call down rather than up, and a
# busy server's event loop needs the other core (docs/serving.md, "Costs the code is shaped by").
ONE_THREAD_ROWS = 64
# Torch runs big CPU calls in blocks of this many rows: a block's activations come back from the allocator warm, one
# call's are fresh pages every time, and blocks bound the memory a big request takes (benchmarks/model_threads.py --blocks).
CPU_BLOCK_ROWS = 1024


class TorchEngine:
    """Runs calls on torch on the calling (model) thread: one thread for small calls, every core for big ones, in
    blocks on the CPU."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()  # every core: what torch had when the server started

    def run(self, version: ModelVersion, call: Call, rows: np.ndarray) -> Outputs:
        wanted = 1 if len(rows) < ONE_THREAD_ROWS else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        if version.device.type != "cpu" or len(rows) <= CPU_BLOCK_ROWS:
            return version.run(call, rows)
        parts = [version.run(call, rows[start:start + CPU_BLOCK_ROWS]) for start in range(0, len(rows), CPU_BLOCK_ROWS)]
        return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))


class one_torch_thread:
    """Torch work off the model threads (loading, warm-up) runs on its calling thread alone.

    OpenMP (libgomp) keeps a team of worker threads for every thread that ever ran torch on several threads. Once a
    process holds more of them than it has cores, every team stops spin-waiting between parallel regions and sleeps
    instead, and a big model call then waits on each wake-up (docs/serving.md).
    """

    def __enter__(self) -> None:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)
