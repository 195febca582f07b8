"""A version folder's files and the state fitted at publishing, read and checked without torch.

``models/checkpoint.py`` builds the torch model on top of this; ``models/served.py`` serves a version from its stored
ONNX graphs with this alone. Every file a version holds besides its manifest and weights is listed in the manifest's
``files`` ({relative path: {"sha256", "bytes"}}) and verified on load like the weights; a version published before the
listing has none, and its other files are not checked.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from aeserve.models.anomaly import AnomalyScore, from_manifest, tensor_shapes
from aeserve.models.outputs import CodeQuantization
from aeserve.models.preprocessing import Preprocessing

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class CheckpointError(ValueError):
    """A version folder that cannot be loaded; the message names the file and the problem."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: each extra file's relative path -> its sha256 and size."""
    return {path: {"sha256": sha256_bytes(data), "bytes": len(data)} for path, data in sorted(files.items())}


def regular_file(path: Path) -> Path:
    """``path``, a file of the version folder itself: not a link leading elsewhere, nor a pipe or device to block on."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CheckpointError(f"{path}: not a regular file (a link, a folder or a device); a version's files are its own")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(regular_file(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_verified(folder: Path, relative: str, sha256: Any) -> bytes:
    """One file of the version folder, checked against the sha256 its manifest gives it."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise CheckpointError(f"{folder / MANIFEST}: listed file {relative!r} is not inside the version folder")
    file = regular_file(folder / path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file is missing") from None
    actual = sha256_bytes(data)
    if actual != sha256:
        raise CheckpointError(f"{file}: sha256 {actual} does not match the manifest's {sha256}; the file was changed or corrupted")
    return data


def read_folder(folder: Path) -> tuple[dict[str, Any], bytes, dict[str, bytes]]:
    """(manifest, weights bytes, listed files by relative path), every file verified against the manifest."""
    manifest = read_json(folder / MANIFEST)
    weights = read_verified(folder, WEIGHTS, manifest.get("sha256"))
    listed = manifest.get("files", {})
    if not isinstance(listed, dict) or not all(isinstance(entry, dict) for entry in listed.values()):
        raise CheckpointError(f"{folder / MANIFEST}: files must map each file's path to its sha256")
    return manifest, weights, {relative: read_verified(folder, relative, entry.get("sha256")) for relative, entry in listed.items()}


@dataclass(frozen=True)
class Scoring:
    """The manifest's anomaly section (None: published before anomaly scores) and its held-out quantiles."""

    quantiles: np.ndarray
    section: dict[str, Any] | None


def scoring(manifest: dict[str, Any], folder: Path) -> Scoring:
    """The manifest's anomaly section and quantiles; ``metrics.error_quantiles`` for a version published before scores.
    Raises KeyError, TypeError or ValueError for a malformed manifest (the caller names it), CheckpointError for bad values."""
    anomaly = manifest.get("anomaly")  # absent: published before anomaly scores, whose scores are the errors
    quantiles_key = "error_quantiles" if anomaly is None else "score_quantiles"
    quantiles = np.asarray(manifest["metrics"][quantiles_key], dtype=np.float64)
    if quantiles.ndim != 1 or len(quantiles) < 2 or not np.all(np.isfinite(quantiles)) or np.any(np.diff(quantiles) < 0):
        raise CheckpointError(f"{folder / MANIFEST}: metrics.{quantiles_key} must be a non-decreasing list of finite numbers")
    return Scoring(quantiles, anomaly)


def state_shapes(manifest: dict[str, Any], scores: Scoring, input_dim: int, code_dim: int, folder: Path | None = None) -> dict[str, tuple[int, ...]]:
    """The weights file's tensors besides the model's and the projector's: name -> shape; CheckpointError naming an
    anomaly section that is not valid."""
    shapes: dict[str, tuple[int, ...]] = {}
    if manifest["preprocessing"].get("per_feature"):
        shapes.update({f"preprocessing.{name}": (input_dim,) for name in ("offset", "scale")})
    if "code_quantization" in manifest:
        shapes.update({f"code_quantization.{name}": (code_dim,) for name in CodeQuantization.TENSORS})
    try:
        shapes.update(tensor_shapes(scores.section, code_dim, input_dim))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{(folder or Path('.')) / MANIFEST}: invalid anomaly section ({type(e).__name__}: {e})") from None
    return shapes


def fitted_state(manifest: dict[str, Any], scores: Scoring, tensors: dict[str, np.ndarray], folder: Path
                 ) -> tuple[Preprocessing, AnomalyScore, CodeQuantization | None]:
    """The preprocessing, the anomaly score and the compact codes' constants from the manifest and the weights'
    tensors (numpy, float32, of the shapes ``state_shapes`` gives); CheckpointError naming a bad value."""
    weights_path = folder / WEIGHTS
    code_quantization = CodeQuantization.from_tensors(tensors) if "code_quantization" in manifest else None
    if code_quantization is not None and not (np.isfinite(code_quantization.scale).all() and (code_quantization.scale > 0).all()
                                              and np.isfinite(code_quantization.threshold).all()):
        raise CheckpointError(f"{weights_path}: code_quantization.scale must be finite and positive, code_quantization.threshold finite")
    try:
        anomaly = from_manifest(scores.section, scores.quantiles, {k: v for k, v in tensors.items() if k.startswith("anomaly.")})
    except ValueError as e:
        raise CheckpointError(f"{weights_path}: {e}") from None
    try:
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"], {k: v for k, v in tensors.items() if k.startswith("preprocessing.")})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / MANIFEST}: invalid preprocessing ({type(e).__name__}: {e})") from None
    return preprocessing, anomaly, code_quantization
