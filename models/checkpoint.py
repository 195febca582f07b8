"""Checkpoint format: ``weights.safetensors`` + ``manifest.json``; nothing pickled. Reading, checking and writing a
version, nothing else: ``load_version`` gives a ``ModelVersion`` (models/version.py), and where it runs is its caller's
business.

A version is rebuilt from its folder alone: the manifest names the kind, the
config, the preprocessing and the held-out error distribution; the weights
file holds the model's tensors under ``model.`` and the projector's under
``projector.``; a version published with compact codes also holds their constants under ``code_quantization.``
(its manifest's ``code_quantization`` says so), and one whose anomaly score has fitted state (the combined score's
code and residual statistics, or a neighbour score's reference set) holds it under ``anomaly.`` (its manifest's
``anomaly`` says which; models/anomaly.py). Percentiles come from
``metrics.score_quantiles``, or for a version published before anomaly scores from ``metrics.error_quantiles``: its
scores are its errors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from aeserve.models.anomaly import AnomalyScore
from aeserve.models.base import Autoencoder
from aeserve.models.files import MANIFEST, WEIGHTS, CheckpointError, fitted_state, read_folder, scoring, sha256_bytes, state_shapes
from aeserve.models.kinds import build_model
from aeserve.models.outputs import CodeQuantization
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.projector import build_projector
from aeserve.models.version import ModelVersion

__all__ = ["MANIFEST", "WEIGHTS", "N_QUANTILES", "CheckpointError", "sha256_bytes", "weights_bytes", "error_quantiles", "load_version"]

# Held-out errors are stored as these many evenly spaced quantiles (0, 0.1, ..., 100 percent).
N_QUANTILES = 1001


def weights_bytes(model: Autoencoder, projector: torch.nn.Module, preprocessing: Preprocessing | None = None,
                  code_quantization: CodeQuantization | None = None, anomaly: AnomalyScore | None = None) -> bytes:
    """Serialise model and projector tensors, per-feature preprocessing vectors, the compact codes' constants and the
    anomaly score's fitted arrays (contiguous float32 on CPU), to safetensors bytes."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"projector.{k}": v for k, v in projector.state_dict().items()})
    if preprocessing is not None:
        tensors.update({k: torch.from_numpy(v) for k, v in preprocessing.tensors().items()})
    if code_quantization is not None:
        tensors.update({k: torch.from_numpy(v) for k, v in code_quantization.tensors().items()})
    if anomaly is not None:
        tensors.update({k: torch.from_numpy(v) for k, v in anomaly.tensors().items()})
    return save_safetensors_bytes({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})


def error_quantiles(errors: np.ndarray) -> list[float]:
    """Held-out per-example errors or scores (n,) -> N_QUANTILES quantiles from 0 to 100 percent."""
    return [float(q) for q in np.quantile(np.asarray(errors, dtype=np.float64), np.linspace(0, 1, N_QUANTILES))]


def load_version(folder: Path, device: str | torch.device = "cpu") -> ModelVersion:
    """Load and verify one version folder. Raises CheckpointError naming the file and the problem."""
    folder = Path(folder)
    manifest, data, files = read_folder(folder)
    weights_path = folder / WEIGHTS
    try:
        input_shape = tuple(int(s) for s in manifest["preprocessing"]["input_shape"])
        # Build on the meta device first: absurd sizes in a manifest cost nothing until checked against the file.
        with torch.device("meta"):
            skeleton = build_model(manifest["kind"], manifest["config"], input_shape)
            projector_spec = manifest.get("projector", {"kind": "pca"})
            skeleton_projector = build_projector(projector_spec["kind"], skeleton.code_dim, projector_spec.get("config"))
        scores = scoring(manifest, folder)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / MANIFEST}: invalid manifest ({type(e).__name__}: {e})") from None
    try:
        tensors = load_safetensors_bytes(data)  # parses the header and copies raw tensor bytes: no code runs
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({e})") from None
    expected_shapes = {f"model.{k}": v.shape for k, v in skeleton.state_dict().items()}
    expected_shapes.update({f"projector.{k}": v.shape for k, v in skeleton_projector.state_dict().items()})
    expected_shapes.update({k: torch.Size(v) for k, v in state_shapes(manifest, scores, skeleton.input_dim, skeleton.code_dim, folder).items()})
    got_shapes = {k: v.shape for k, v in tensors.items()}
    if got_shapes != expected_shapes:
        # In the order expected: the model's tensors first, then the projector's, preprocessing's and the codes' constants.
        missing = [k for k in expected_shapes if k not in got_shapes]
        extra = sorted(set(got_shapes) - set(expected_shapes))
        wrong = [k for k in expected_shapes if k in got_shapes and got_shapes[k] != expected_shapes[k]]
        raise CheckpointError(f"{weights_path}: tensors do not match the manifest's model (missing {missing}, unexpected {extra}, wrong shape {wrong})")
    if any(t.dtype != torch.float32 for t in tensors.values()):
        raise CheckpointError(f"{weights_path}: every tensor must be float32")
    preprocessing, anomaly, code_quantization = fitted_state(manifest, scores, {k: v.numpy() for k, v in tensors.items()}, folder)

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
    return ModelVersion(manifest, model, projector, preprocessing, anomaly, device, folder, code_quantization, files)
