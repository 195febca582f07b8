"""Shared fixtures: small data, fixed seeds, a registry in a temporary folder."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train

# Tiny tensors: one thread is faster than two and keeps timings steady on a shared machine.
torch.set_num_threads(1)
# Servers started by tests run torch only: the ONNX export child costs seconds per start. The engine's own tests
# (tests/models/test_onnx_engine.py, tests/service/api/test_routes.py) ask for it.
os.environ.setdefault("AESERVE_ENGINE", "torch")

# Small, fast settings for each kind; the shared interface tests run over all of them.
KIND_CONFIGS = {
    "pca": {"code_dim": 4},
    "linear": {"code_dim": 4},
    "mlp": {"code_dim": 4, "hidden": [32, 16]},
    "rbm": {"code_dim": 4, "hidden": [32, 16], "pretrain_epochs": 2},
    "conv": {"code_dim": 4, "channels": [8, 16], "activation": "gdn", "loss": "mse"},  # as configs/fmnist-64d.toml
    "vae": {"code_dim": 4, "hidden": [32]},
    "rd": {"channels": 8, "latent_channels": 1},  # a (1, 2, 2) latent on 8x8 digits: a code of 4 integers
}


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (magic 0x00000800 + ndim, big-endian sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST lookalike in IDX format: 200 train and 50 test 28x28 images."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 64 + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


def digits_run(name: str, kind: str, epochs: int = 3, anomaly: dict | None = None, **train_overrides):
    """A small digits run. Its percentiles rest on the held-out rows (no cross-fit: five more models per run, and fold
    models of 3 epochs score unlike the version); tests of the cross-fit pass ``anomaly``."""
    return build_run_config({
        "name": name,
        "data": {"source": "digits", "limit": 400},
        "model": {"kind": kind, **KIND_CONFIGS[kind]},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 3e-3, **train_overrides},
        "anomaly": {"cross_fit_rows": 0} if anomaly is None else anomaly,
    })


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One small digits version of every kind, trained once per test session."""
    registry = Registry(tmp_path_factory.mktemp("trained") / "registry")
    for kind in KIND_CONFIGS:
        train(digits_run(f"digits-{kind}", kind), registry, progress=False)
    return registry


@pytest.fixture(scope="session")
def onnx_exported(trained_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Graphs for ONNX Runtime of every kind, a t-SNE-projector version (whose projector does not export) and one whose
    weights changed after it loaded, through one export child (it takes about 20 s):
    (name -> version; name -> its graphs' ONNX bytes, for the versions whose graphs exported and passed the check)."""
    import shutil

    from aeserve.models.checkpoint import WEIGHTS
    from aeserve.service.runtime.export import GraphExport

    extra = Registry(tmp_path_factory.mktemp("engine") / "registry")
    config = build_run_config({"name": "tsne", "data": {"source": "digits", "limit": 300}, "model": {"kind": "pca", "code_dim": 6},
                               "projector": {"kind": "tsne", "perplexity": 10}, "train": {"report": False}})
    train(config, extra, progress=False)
    shutil.copytree(trained_registry.version_dir("digits-mlp", 1), extra.root / "changed" / "1")
    loaded = {kind: trained_registry.load(f"digits-{kind}") for kind in KIND_CONFIGS}
    loaded["tsne"] = extra.load("tsne")
    loaded["changed"] = extra.load("changed")
    (extra.version_dir("changed", 1) / WEIGHTS).write_bytes(b"not the weights it loaded")
    names = {id(version): name for name, version in loaded.items()}
    graphs: dict[str, dict[str, bytes]] = {}
    GraphExport([v.folder for v in loaded.values()]).collect(list(loaded.values()), lambda v, g: graphs.__setitem__(names[id(v)], g))
    return loaded, graphs


def tamper_version(registry: Registry, name: str, weights: bytes | None = None, **manifest_changes) -> None:
    """Rewrite version 1's weights and/or manifest fields, keeping the sha256 consistent (a deliberate attack, not corruption)."""
    import json

    from aeserve.models.checkpoint import MANIFEST, WEIGHTS, sha256_bytes

    folder = registry.version_dir(name, 1)
    manifest = json.loads((folder / MANIFEST).read_text())
    if weights is not None:
        (folder / WEIGHTS).write_bytes(weights)
        manifest["sha256"] = sha256_bytes(weights)
    manifest.update(manifest_changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def strip_graphs(registry: Registry, name: str, number: int = 1) -> None:
    """Make a version look published before graphs were stored: no graphs section, no listed files, no graphs/."""
    import json
    import shutil

    from aeserve.models.checkpoint import MANIFEST

    folder = registry.version_dir(name, number)
    shutil.rmtree(folder / "graphs")
    manifest = json.loads((folder / MANIFEST).read_text())
    for key in ("graphs", "files"):
        manifest.pop(key)
    (folder / MANIFEST).write_text(json.dumps(manifest))


from tests.s3 import s3_bucket, s3_server  # noqa: E402,F401  (fixtures: an S3 API server on loopback)
