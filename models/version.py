"""A loaded version, and its calls on torch in this process.

``models/checkpoint.py`` reads a version folder into a ``ModelVersion``; ``run`` answers any call of
``models/outputs.py`` on torch. Training, ``aeserve eval`` and the tests call it directly; the server's torch engine
(``service/runtime/torch_engine.py``) calls it on its model threads, in blocks and with its own thread counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aeserve.models.anomaly import AnomalyScore
from aeserve.models.base import Autoencoder
from aeserve.models.outputs import OUTPUTS, Call, CodeQuantization, compute
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.served import VersionFacts, stored_graphs
from aeserve.models.streams import RangeCoder, StreamFormat


class TorchGraphs:
    """``Graphs`` (models/outputs.py) on torch, on the version's device.

    On the CPU tensors share the numpy arrays' memory and nothing calls ``.to()``: a no-op there, but every torch call
    lets go of the GIL. Off the CPU raw rows cross as they came and are scaled on the device, one copy each way.
    """

    def __init__(self, version: ModelVersion) -> None:
        self.model, self.projector, self.pre, self.device = version.model, version.projector, version.preprocessing, version.device
        self.on_cpu = version.device.type == "cpu"

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        # Rows decoded from a request body view its read-only bytes, and torch may not share memory it could write to:
        # on the CPU such rows are copied (only codes come here there: rows x code size), elsewhere torch.tensor makes
        # the one copy to the device straight from them.
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.on_cpu:
            return torch.from_numpy(x if x.flags.writeable else x.copy())
        return torch.tensor(x, device=self.device)

    def numpy(self, t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((t if self.on_cpu else t.to("cpu")).numpy())

    def to_model(self, x: np.ndarray) -> torch.Tensor:
        if self.on_cpu:
            return torch.from_numpy(self.pre.to_model(x))  # a new array: scaling never answers a view of its input
        return self.pre.to_model_tensor(self._tensor(x))

    def from_model(self, x: torch.Tensor) -> np.ndarray:
        if self.on_cpu:
            return self.pre.from_model(x.numpy())
        return self.numpy(self.pre.from_model_tensor(x))

    def codes_in(self, z: np.ndarray) -> torch.Tensor:
        return self._tensor(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return self.projector(z)

    @staticmethod
    def squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_hat - x).pow(2).sum(dim=1)

    @staticmethod
    def squared_errors(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x_hat - x).pow(2)


@dataclass
class ModelVersion(VersionFacts):
    """A loaded version, on torch. All methods take and return numpy float32 arrays.

    Raw inputs are (n, *input_shape) or (n, input_dim); codes are (n, code_dim).
    """

    manifest: dict[str, Any]
    model: Autoencoder
    projector: torch.nn.Module  # codes (n, code_dim) -> map coordinates (n, 2)
    preprocessing: Preprocessing
    anomaly: AnomalyScore  # what scores rows, and the held-out scores' quantiles (models/anomaly.py)
    device: torch.device
    folder: Path | None = None  # the version folder it was loaded from
    code_quantization: CodeQuantization | None = None  # fitted at publish; None for a version published before compact codes
    files: dict[str, bytes] = field(default_factory=dict)  # the folder's other files, as the manifest lists them, verified

    def __post_init__(self) -> None:
        self._graphs = TorchGraphs(self)
        tables = self.model.coding_tables()
        # Compressed streams, for a version with an entropy model (kind rd); None for the others, and for one not yet
        # published (the trainer's, making its report), whose streams would have no version number to carry.
        published = "version" in self.manifest
        self.streams = None if tables is None or not published else StreamFormat(self.name, self.version, RangeCoder(*tables))

    @property
    def code_dim(self) -> int:
        return self.model.code_dim

    @property
    def graphs(self) -> dict[str, bytes]:
        """The ONNX graphs stored with the version (models/served.py), verified on load; {} for one without them."""
        return stored_graphs(self.manifest, self.files)

    def warm(self) -> None:
        """Run every graph once so the first request pays no one-off costs."""
        self.decode(self.run(Call("inputs", tuple(OUTPUTS)), np.zeros((1, *self.input_shape), np.float32))[0])

    @torch.inference_mode()
    def run(self, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The outputs ``call`` asks for (models/outputs.py), in one pass of the model over ``rows``."""
        return compute(self._graphs, self.anomaly, call, rows)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, code_dim)."""
        return self.run(ENCODE, x)[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(n, code_dim) -> (n, *input_shape) raw."""
        return self.run(DECODE, z)[0]

    def reconstruct(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, *input_shape) raw -> (reconstructions (n, *input_shape) raw, errors (n,), percentiles (n,)).

        Errors are summed squared errors in model space (inputs scaled to [0, 1]),
        the same measure as ``metrics.test_sq_err``; percentiles place the rows' anomaly scores among
        the held-out rows' scores, 0-100.
        """
        return self.run(RECONSTRUCT, x)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n,) the version's anomaly scores (models/anomaly.py)."""
        return self.run(SCORE, x)[0]

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, 2) map coordinates."""
        return self.run(PROJECT, x)[0]


ENCODE, DECODE = Call("inputs", ("code",)), Call("codes", ("reconstruction",))
RECONSTRUCT, PROJECT = Call("inputs", ("reconstruction", "error", "percentile")), Call("inputs", ("coordinates",))
SCORE = Call("inputs", ("score",))
