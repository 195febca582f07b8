"""Checkpoint format: ``weights.safetensors`` + ``manifest.json``; nothing pickled.

A version is rebuilt from its folder alone: the manifest names the kind, the
config, the preprocessing and the held-out error distribution; the weights
file holds the model's tensors under ``model.`` and the projector's under
``projector.``; a version published with compact codes also holds their constants under ``code_quantization.``
(its manifest's ``code_quantization`` says so).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from aeserve.models.base import Autoencoder
from aeserve.models.entropy import RangeCoder
from aeserve.models.kinds import build_model
from aeserve.models.outputs import Call, CodeQuantization, compute, percentiles
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.projector import build_projector
from aeserve.models.streams import StreamFormat

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
# Held-out errors are stored as these many evenly spaced quantiles (0, 0.1, ..., 100 percent).
N_QUANTILES = 1001
# Request bodies arrive as read-only buffers, and torch warns once when a tensor is made over one; these are only read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class CheckpointError(ValueError):
    """A version folder that cannot be loaded; the message names the file and the problem."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_bytes(model: Autoencoder, projector: torch.nn.Module, preprocessing: Preprocessing | None = None,
                  code_quantization: CodeQuantization | None = None) -> bytes:
    """Serialise model and projector tensors, per-feature preprocessing vectors and the compact codes' constants
    (contiguous float32 on CPU), to safetensors bytes."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"projector.{k}": v for k, v in projector.state_dict().items()})
    if preprocessing is not None:
        tensors.update({k: torch.from_numpy(v) for k, v in preprocessing.tensors().items()})
    if code_quantization is not None:
        tensors.update({k: torch.from_numpy(v) for k, v in code_quantization.tensors().items()})
    return save_safetensors_bytes({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


def error_quantiles(errors: np.ndarray) -> list[float]:
    """Held-out per-example errors (n,) -> N_QUANTILES quantiles from 0 to 100 percent."""
    return [float(q) for q in np.quantile(np.asarray(errors, dtype=np.float64), np.linspace(0, 1, N_QUANTILES))]


class TorchGraphs:
    """``Graphs`` (models/outputs.py) on torch, on the version's device.

    On the CPU tensors share the numpy arrays' memory and nothing calls ``.to()``: a no-op there, but every torch call
    lets go of the GIL. Off the CPU raw rows cross as they came and are scaled on the device, one copy each way.
    """

    def __init__(self, version: ModelVersion) -> None:
        self.model, self.projector, self.pre, self.device = version.model, version.projector, version.preprocessing, version.device
        self.on_cpu = version.device.type == "cpu"

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t if self.on_cpu else t.to(self.device)

    def numpy(self, t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((t if self.on_cpu else t.to("cpu")).numpy())

    def to_model(self, x: np.ndarray) -> torch.Tensor:
        if self.on_cpu:
            return torch.from_numpy(self.pre.to_model(x))
        return self.pre.to_model_tensor(self._tensor(x))

    def from_model(self, x: torch.Tensor) -> np.ndarray:
        if self.on_cpu:
            return self.pre.from_model(x.numpy())
        return self.numpy(self.pre.from_model_tensor(x))

    def codes_in(self, z: np.ndarray) -> torch.Tensor:
        # Codes decoded from a request body view its read-only bytes; torch may not share memory it could write to.
        # Codes are small (rows x code size), so the copy costs little.
        return self._tensor(z if z.flags.writeable else z.copy())

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
class ModelVersion:
    """A loaded version, on torch. All methods take and return numpy float32 arrays.

    Raw inputs are (n, *input_shape) or (n, input_dim); codes are (n, code_dim).
    """

    manifest: dict[str, Any]
    model: Autoencoder
    projector: torch.nn.Module  # codes (n, code_dim) -> map coordinates (n, 2)
    preprocessing: Preprocessing
    quantiles: np.ndarray  # (N_QUANTILES,) float64, held-out summed squared errors
    device: torch.device
    folder: Path | None = None  # the version folder it was loaded from
    code_quantization: CodeQuantization | None = None  # fitted at publish; None for a version published before compact codes

    def __post_init__(self) -> None:
        self._graphs = TorchGraphs(self)
        tables = self.model.coding_tables()
        # Compressed streams, for a version with an entropy model (kind rd); None for the others.
        self.streams = None if tables is None else StreamFormat(self.name, self.version, RangeCoder(*tables))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.preprocessing.input_shape

    @property
    def code_dim(self) -> int:
        return self.model.code_dim

    @torch.inference_mode()
    def run(self, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The outputs ``call`` asks for (models/outputs.py), in one pass of the model over ``rows``."""
        return compute(self._graphs, self.quantiles, call, rows)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, code_dim)."""
        return self.run(ENCODE, x)[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(n, code_dim) -> (n, *input_shape) raw."""
        return self.run(DECODE, z)[0]

    def reconstruct(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, *input_shape) raw -> (reconstructions (n, *input_shape) raw, errors (n,), percentiles (n,)).

        Errors are summed squared errors in model space (inputs scaled to [0, 1]),
        the same measure as ``metrics.test_sq_err``; percentiles place them among
        the held-out errors, 0-100.
        """
        return self.run(RECONSTRUCT, x)

    def percentiles(self, errors: np.ndarray) -> np.ndarray:
        """Where each error falls among the held-out errors, 0-100, float32."""
        return percentiles(self.quantiles, errors)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, 2) map coordinates."""
        return self.run(PROJECT, x)[0]


ENCODE, DECODE = Call("inputs", ("code",)), Call("codes", ("reconstruction",))
RECONSTRUCT, PROJECT = Call("inputs", ("reconstruction", "error", "percentile")), Call("inputs", ("coordinates",))


def _regular_file(path: Path) -> Path:
    """``path``, a file of the version folder itself: not a link leading elsewhere, nor a pipe or device to block on."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointError(f"{path}: not a regular file (a link, a folder or a device); a version's files are its own")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(_regular_file(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def load_version(folder: Path, device: str | torch.device = "cpu") -> ModelVersion:
    """Load and verify one version folder. Raises CheckpointError naming the file and the problem."""
    folder = Path(folder)
    manifest = _read_json(folder / MANIFEST)
    weights_path = _regular_file(folder / WEIGHTS)
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: file is missing") from None
    expected = manifest.get("sha256")
    actual = sha256_bytes(data)
    if actual != expected:
        raise CheckpointError(f"{weights_path}: sha256 {actual} does not match the manifest's {expected}; the file was changed or corrupted")
    try:
        input_shape = tuple(int(s) for s in manifest["preprocessing"]["input_shape"])
        per_feature = bool(manifest["preprocessing"].get("per_feature"))
        # Build on the meta device first: absurd sizes in a manifest cost nothing until checked against the file.
        with torch.device("meta"):
            skeleton = build_model(manifest["kind"], manifest["config"], input_shape)
            projector_spec = manifest.get("projector", {"kind": "pca"})
            skeleton_projector = build_projector(projector_spec["kind"], skeleton.code_dim, projector_spec.get("config"))
        quantiles = np.asarray(manifest["metrics"]["error_quantiles"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / MANIFEST}: invalid manifest ({type(e).__name__}: {e})") from None
    if quantiles.ndim != 1 or len(quantiles) < 2 or not np.all(np.isfinite(quantiles)) or np.any(np.diff(quantiles) < 0):
        raise CheckpointError(f"{folder / MANIFEST}: metrics.error_quantiles must be a non-decreasing list of finite numbers")
    try:
        tensors = load_safetensors_bytes(data)  # parses the header and copies raw tensor bytes: no code runs
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({e})") from None
    expected_shapes = {f"model.{k}": v.shape for k, v in skeleton.state_dict().items()}
    expected_shapes.update({f"projector.{k}": v.shape for k, v in skeleton_projector.state_dict().items()})
    if per_feature:
        expected_shapes.update({f"preprocessing.{name}": torch.Size([skeleton.input_dim]) for name in ("offset", "scale")})
    quantized = "code_quantization" in manifest
    if quantized:
        expected_shapes.update({f"code_quantization.{name}": torch.Size([skeleton.code_dim]) for name in CodeQuantization.TENSORS})
    got_shapes = {k: v.shape for k, v in tensors.items()}
    if got_shapes != expected_shapes:
        # In the order expected: the model's tensors first, then the projector's, preprocessing's and the codes' constants.
        missing = [k for k in expected_shapes if k not in got_shapes]
        extra = sorted(set(got_shapes) - set(expected_shapes))
        wrong = [k for k in expected_shapes if k in got_shapes and got_shapes[k] != expected_shapes[k]]
        raise CheckpointError(f"{weights_path}: tensors do not match the manifest's model (missing {missing}, unexpected {extra}, wrong shape {wrong})")
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise CheckpointError(f"{weights_path}: every tensor must be float32")
    code_quantization = CodeQuantization.from_tensors({k: v.numpy() for k, v in tensors.items()}) if quantized else None
    if code_quantization is not None and not (np.isfinite(code_quantization.scale).all() and (code_quantization.scale > 0).all()
                                              and np.isfinite(code_quantization.threshold).all()):
        raise CheckpointError(f"{weights_path}: code_quantization.scale must be finite and positive, code_quantization.threshold finite")
    try:
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"], {k: v.numpy() for k, v in tensors.items() if k.startswith("preprocessing.")})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / MANIFEST}: invalid preprocessing ({type(e).__name__}: {e})") from None

    contradictions = [f"{key} {manifest.get(key)!r} but the model config gives {want!r}"
                      for key, want in (("input_shape", list(preprocessing.input_shape)), ("code_dim", skeleton.code_dim))
                      if manifest.get(key) != want]
    if contradictions:
        raise CheckpointError(f"{folder / MANIFEST}: the manifest contradicts itself: {'; '.join(contradictions)}")

    model = build_model(manifest["kind"], manifest["config"], preprocessing.input_shape)
    projector = build_projector(projector_spec["kind"], model.code_dim, projector_spec.get("config"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    device = torch.device(device)
    model.to(device).eval()
    projector.to(device).eval()
    return ModelVersion(manifest, model, projector, preprocessing, quantiles, device, folder, code_quantization)
