"""A version's graphs on ONNX Runtime, and the outputs computed from them (``models/outputs.py``).

Imports numpy and ONNX Runtime, never torch: the engine process runs this same code without paying for torch.
"""
from __future__ import annotations

import numpy as np

from aeserve.models.anomaly import AnomalyScore
from aeserve.models.outputs import Call, NumpyGraphs, compute
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.served import graphs_serve, onnx_session

__all__ = ["OnnxVersion", "graphs_serve"]


class OnnxVersion:
    """ONNX Runtime sessions for a version's graphs (``encode``, ``decode``, maybe ``project``), one thread each:
    small batches gain nothing from more."""

    def __init__(self, graphs: dict[str, bytes], preprocessing: Preprocessing, anomaly: AnomalyScore) -> None:
        self._sessions = {name: onnx_session(graph, threads=1) for name, graph in graphs.items()}
        self._inputs = {name: session.get_inputs()[0].name for name, session in self._sessions.items()}
        self.preprocessing = preprocessing
        self.anomaly = anomaly
        self._graphs = NumpyGraphs(preprocessing, self.graph)

    def has(self, graph: str) -> bool:
        return graph in self._sessions

    def graph(self, name: str, x: np.ndarray) -> np.ndarray:
        """(n, d) float32 through graph ``name`` -> its output (n, ...) float32."""
        return self._sessions[name].run(None, {self._inputs[name]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def serves(self, call: Call) -> bool:
        """Whether all of ``call`` runs here."""
        return graphs_serve(self._sessions, call)

    def run(self, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return compute(self._graphs, self.anomaly, call, rows)

    def warm(self) -> None:
        """Run every session once: the first run of each costs milliseconds."""
        x = np.zeros((1, *self.preprocessing.input_shape), np.float32)
        self.run(Call("inputs", ("code", "error", "score", "coordinates") if self.has("project") else ("code", "error", "score")), x)
