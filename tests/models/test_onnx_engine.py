"""The ONNX Runtime engine: small batches run on it and match torch; large batches, and whatever it cannot take, stay on torch."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from aeserve.models.onnx_engine import EngineExport, mismatch
from aeserve.models.small_batches import SMALL_BATCH_ROWS

from tests.conftest import KIND_CONFIGS

pytest.importorskip("onnxruntime")

# float32 kernels differ between torch and ONNX Runtime: tolerances on codes and on pixel values (0..16).
CODE_ATOL = 1e-4
DATA_ATOL = 1e-3


@pytest.fixture(scope="module")
def versions(onnx_exported) -> dict:
    return onnx_exported[0]


def rows(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 8, 8)) * 16).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_small_batches_run_on_the_engine_and_match_torch(versions, kind):
    version = versions[kind]
    assert version.engine is not None
    for n in (1, 5):
        x = rows(n)
        codes = version.encode(x)
        np.testing.assert_array_equal(codes, version.engine.run("encode", version.preprocessing.to_model(x)))
        np.testing.assert_allclose(codes, version._encode_torch(x), atol=CODE_ATOL)
        np.testing.assert_allclose(version.decode(codes), version._decode_torch(codes), atol=DATA_ATOL)
        np.testing.assert_allclose(version.project(x), version._project_torch(x), atol=CODE_ATOL)
        for got, want in zip(version.reconstruct(x), version._reconstruct_torch(x), strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, atol=DATA_ATOL, rtol=1e-4)


def test_large_batches_stay_on_torch(versions):
    version = versions["mlp"]
    x = rows(SMALL_BATCH_ROWS)
    np.testing.assert_array_equal(version.encode(x), version._encode_torch(x))
    np.testing.assert_array_equal(version.reconstruct(x)[0], version._reconstruct_torch(x)[0])
    below = version.preprocessing.to_model(x[:SMALL_BATCH_ROWS - 1])
    np.testing.assert_array_equal(version.encode(x[:SMALL_BATCH_ROWS - 1]), version.engine.run("encode", below))


def test_a_projector_that_does_not_export_is_left_to_torch(versions):
    version = versions["tsne"]
    assert version.engine is not None and not version.engine.has("project") and version.engine.has("encode")
    x = rows(3)
    with torch.inference_mode():
        placed = version.projector(torch.from_numpy(version.encode(x))).numpy()
    np.testing.assert_array_equal(version.project(x), placed)


def test_a_version_the_export_cannot_load_stays_on_torch(versions, trained_registry, caplog):
    assert versions["changed"].engine is None
    x = rows(2)
    np.testing.assert_array_equal(versions["changed"].encode(x), versions["changed"]._encode_torch(x))
    # The same check, seen in the log, on a fresh export of that folder alone.
    version = trained_registry.load("digits-mlp")
    export = EngineExport([versions["changed"].folder])
    version.folder = versions["changed"].folder
    with caplog.at_level(logging.WARNING, logger="aeserve.onnx"):
        export.attach([version])
    assert version.engine is None
    assert "digits-mlp:1 stay on torch" in caplog.text and "sha256" in caplog.text


def test_an_engine_that_differs_from_torch_is_named(versions):
    assert mismatch(versions["mlp"], versions["mlp"].engine) is None
    why = mismatch(versions["mlp"], versions["rbm"].engine)  # same shapes, other weights
    assert why is not None and why.startswith("encode differs from torch by up to")
