"""Checkpoint format: ``weights.safetensors`` + ``manifest.json``; nothing pickled.

A version is rebuilt from its folder alone: the manifest names the kind, the
config, the preprocessing and the held-out error distribution; the weights
file holds the model's tensors under ``model.`` and the projector's under
``projector.``.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aeserve.models import small_batches
from aeserve.models.base import Autoencoder
from aeserve.models.kinds import build_model
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.projector import build_projector
from aeserve.models.small_batches import SMALL_BATCH_ROWS, OnnxEngine
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
# Torch runs big CPU calls in blocks of this many rows. With the default MLP on 2 cores, 10,000 rows took 251 ms to
# encode and 517 ms to reconstruct in blocks of 1,024, against 306 and 608 ms in one call (benchmarks/model_threads.py
# --blocks). A block's activations (4 MB in the first layer) come back from the allocator warm; one call's (40 MB)
# are fresh pages every time. Blocks also bound the memory a big request takes.
CPU_BLOCK_ROWS = 1024
# Held-out errors are stored as these many evenly spaced quantiles (0, 0.1, ..., 100 percent).
N_QUANTILES = 1001
# Request bodies arrive as read-only buffers, and torch warns once when a tensor is made over one; these are only read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class CheckpointError(ValueError):
    """A version folder that cannot be loaded; the message names the file and the problem."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_bytes(model: Autoencoder, projector: torch.nn.Module) -> bytes:
    """Serialise model and projector tensors (contiguous float32 on CPU) to safetensors bytes."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"projector.{k}": v for k, v in projector.state_dict().items()})
    return save_safetensors_bytes({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


def error_quantiles(errors: np.ndarray) -> list[float]:
    """Held-out per-example errors (n,) -> N_QUANTILES quantiles from 0 to 100 percent."""
    return [float(q) for q in np.quantile(np.asarray(errors, dtype=np.float64), np.linspace(0, 1, N_QUANTILES))]


@dataclass
class ModelVersion:
    """A loaded, ready-to-use version. All methods take and return numpy float32 arrays.

    Raw inputs are (n, *input_shape) or (n, input_dim); codes are (n, code_dim).
    """

    manifest: dict[str, Any]
    model: Autoencoder
    projector: torch.nn.Module  # codes (n, code_dim) -> map coordinates (n, 2)
    preprocessing: Preprocessing
    quantiles: np.ndarray  # (N_QUANTILES,) float64, held-out summed squared errors
    device: torch.device
    folder: Path | None = None  # the version folder it was loaded from
    # Calls of fewer than SMALL_BATCH_ROWS rows run here when set (the server sets it on the CPU); torch runs the rest.
    engine: OnnxEngine | None = None

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

    # On the CPU both conversions skip .to(): it would be a no-op, but every torch call lets go of the GIL, and
    # in the server the model thread then waits for the event loop to hand it back.
    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t if self.device.type == "cpu" else t.to(self.device)

    @staticmethod
    def _numpy(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray((t if t.device.type == "cpu" else t.to("cpu")).numpy())

    # Off the CPU, raw values are scaled on the device: one pass over a big batch on the host saved each way.
    def _model_input(self, x: np.ndarray) -> torch.Tensor:
        """Raw rows -> (n, input_dim) model-space tensor on the version's device."""
        if self.device.type == "cpu":
            return torch.from_numpy(self.preprocessing.to_model(x))
        return self.preprocessing.to_model_tensor(self._tensor(x))

    def _raw_output(self, x_model: torch.Tensor) -> np.ndarray:
        """(n, input_dim) model-space tensor -> (n, *input_shape) raw values."""
        if self.device.type == "cpu":
            return self.preprocessing.from_model(x_model.numpy())
        return self._numpy(self.preprocessing.from_model_tensor(x_model))

    def _engine_for(self, rows: int) -> OnnxEngine | None:
        """The engine for a call of ``rows`` rows, or None for torch (read once: a server may take it away meanwhile)."""
        return self.engine if rows < SMALL_BATCH_ROWS else None

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, code_dim)."""
        if (engine := self._engine_for(len(x))) is not None:
            return small_batches.encode(engine, self.preprocessing, x)
        return self._encode_torch(x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(n, code_dim) -> (n, *input_shape) raw."""
        if (engine := self._engine_for(len(z))) is not None:
            return small_batches.decode(engine, self.preprocessing, z)
        return self._decode_torch(z)

    def reconstruct(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, *input_shape) raw -> (reconstructions (n, *input_shape) raw, errors (n,), percentiles (n,)).

        Errors are summed squared errors in model space (inputs scaled to [0, 1]),
        the same measure as ``metrics.test_sq_err``; percentiles place them among
        the held-out errors, 0-100.
        """
        if (engine := self._engine_for(len(x))) is not None:
            return small_batches.reconstruct(engine, self.preprocessing, self.quantiles, x)
        return self._reconstruct_torch(x)

    def percentiles(self, errors: np.ndarray) -> np.ndarray:
        """Where each error falls among the held-out errors, 0-100, float32."""
        return small_batches.percentiles(self.quantiles, errors)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) raw -> (n, 2) map coordinates."""
        if (engine := self._engine_for(len(x))) is not None:
            if engine.serves("project"):
                return small_batches.project(engine, self.preprocessing, x)
            codes = small_batches.encode(engine, self.preprocessing, x)
            with torch.inference_mode():
                return self._numpy(self.projector(self._tensor(codes)))
        return self._project_torch(x)

    def _in_blocks(self, run: Callable[[np.ndarray], tuple[np.ndarray, ...]], x: np.ndarray) -> tuple[np.ndarray, ...]:
        """``run`` over ``x`` in blocks of CPU_BLOCK_ROWS rows on the CPU (outputs joined), in one call elsewhere."""
        if self.device.type != "cpu" or len(x) <= CPU_BLOCK_ROWS:
            return run(x)
        parts = [run(x[start:start + CPU_BLOCK_ROWS]) for start in range(0, len(x), CPU_BLOCK_ROWS)]
        return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))

    def _encode_torch(self, x: np.ndarray) -> np.ndarray:
        return self._in_blocks(self._encode_block, x)[0]

    def _decode_torch(self, z: np.ndarray) -> np.ndarray:
        return self._in_blocks(self._decode_block, z)[0]

    def _reconstruct_torch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x_hat, errors = self._in_blocks(self._reconstruct_block, x)
        return x_hat, errors, self.percentiles(errors)

    def _project_torch(self, x: np.ndarray) -> np.ndarray:
        return self._in_blocks(self._project_block, x)[0]

    @torch.inference_mode()
    def _encode_block(self, x: np.ndarray) -> tuple[np.ndarray]:
        return (self._numpy(self.model.encode(self._model_input(x))),)

    @torch.inference_mode()
    def _decode_block(self, z: np.ndarray) -> tuple[np.ndarray]:
        return (self._raw_output(self.model.decode(self._tensor(z))),)

    @torch.inference_mode()
    def _reconstruct_block(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_model = self._model_input(x)
        x_hat = self.model(x_model)
        errors = self._numpy((x_hat - x_model).pow(2).sum(dim=1))
        return self._raw_output(x_hat), errors

    @torch.inference_mode()
    def _project_block(self, x: np.ndarray) -> tuple[np.ndarray]:
        codes = self.model.encode(self._model_input(x))
        return (self._numpy(self.projector(codes)),)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def load_version(folder: Path, device: str | torch.device = "cpu") -> ModelVersion:
    """Load and verify one version folder. Raises CheckpointError naming the file and the problem."""
    folder = Path(folder)
    manifest = _read_json(folder / MANIFEST)
    weights_path = folder / WEIGHTS
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: file is missing") from None
    expected = manifest.get("sha256")
    actual = sha256_bytes(data)
    if actual != expected:
        raise CheckpointError(f"{weights_path}: sha256 {actual} does not match the manifest's {expected}; the file was changed or corrupted")
    try:
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        # Build on the meta device first: absurd sizes in a manifest cost nothing until checked against the file.
        with torch.device("meta"):
            skeleton = build_model(manifest["kind"], manifest["config"], preprocessing.input_shape)
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
    got_shapes = {k: v.shape for k, v in tensors.items()}
    if got_shapes != expected_shapes:
        missing = sorted(set(expected_shapes) - set(got_shapes))
        extra = sorted(set(got_shapes) - set(expected_shapes))
        wrong = sorted(k for k in set(got_shapes) & set(expected_shapes) if got_shapes[k] != expected_shapes[k])
        raise CheckpointError(f"{weights_path}: tensors do not match the manifest's model (missing {missing}, unexpected {extra}, wrong shape {wrong})")
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise CheckpointError(f"{weights_path}: every tensor must be float32")

    model = build_model(manifest["kind"], manifest["config"], preprocessing.input_shape)
    projector = build_projector(projector_spec["kind"], model.code_dim, projector_spec.get("config"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    device = torch.device(device)
    model.to(device).eval()
    projector.to(device).eval()
    return ModelVersion(manifest, model, projector, preprocessing, quantiles, device, folder)
