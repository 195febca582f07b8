"""Small batches on ONNX Runtime: a version's exported graphs and the four operations on them.

Calls of fewer than ``SMALL_BATCH_ROWS`` rows run here, bigger ones on torch
(``models/onnx_engine.py`` says why). This module imports numpy and ONNX
Runtime only, never torch: the server's engine process
(``service/engine_process.py``) runs these same functions without paying for
torch, and ``ModelVersion`` runs them in-process.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from aeserve.models.preprocessing import Preprocessing

SMALL_BATCH_ROWS = 128
OPERATIONS = ("encode", "decode", "reconstruct", "project")


class OnnxEngine:
    """ONNX Runtime sessions for a version's graphs, one intra-op thread each (small batches gain nothing from more)."""

    def __init__(self, graphs: dict[str, bytes]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self._sessions = {name: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
                          for name, graph in graphs.items()}
        self._inputs = {name: session.get_inputs()[0].name for name, session in self._sessions.items()}

    def has(self, graph: str) -> bool:
        return graph in self._sessions

    def run(self, graph: str, x: np.ndarray) -> np.ndarray:
        """(n, d) float32 -> the graph's output (n, ...) float32."""
        return self._sessions[graph].run(None, {self._inputs[graph]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def serves(self, operation: str) -> bool:
        """Whether all of ``operation`` runs here."""
        return operation in served_operations(self._sessions)


def served_operations(graphs: Iterable[str]) -> frozenset[str]:
    """The operations that run wholly on these graphs: ``project`` needs the projector's, which may not export."""
    return frozenset(op for op in OPERATIONS if op != "project" or "project" in graphs)


def percentiles(quantiles: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Where each error falls among the held-out errors (given as evenly spaced ``quantiles``), 0-100, float32."""
    grid = np.linspace(0.0, 100.0, len(quantiles))
    return np.interp(errors.astype(np.float64), quantiles, grid).astype(np.float32)


def encode(engine: OnnxEngine, pre: Preprocessing, x: np.ndarray) -> np.ndarray:
    """(n, *input_shape) raw -> (n, code_dim)."""
    return engine.run("encode", pre.to_model(x))


def decode(engine: OnnxEngine, pre: Preprocessing, z: np.ndarray) -> np.ndarray:
    """(n, code_dim) -> (n, *input_shape) raw."""
    return pre.from_model(engine.run("decode", z))


def reconstruct(engine: OnnxEngine, pre: Preprocessing, quantiles: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, *input_shape) raw -> (reconstructions raw, summed squared errors in model space, their percentiles)."""
    x_model = pre.to_model(x)
    x_hat = engine.run("decode", engine.run("encode", x_model))
    errors = np.square(x_hat - x_model).sum(axis=1)
    return pre.from_model(x_hat), errors, percentiles(quantiles, errors)


def project(engine: OnnxEngine, pre: Preprocessing, x: np.ndarray) -> np.ndarray:
    """(n, *input_shape) raw -> (n, 2) map coordinates; needs ``engine.has("project")``."""
    return engine.run("project", engine.run("encode", pre.to_model(x)))
