"""The checkpoint format: a version folder loads only whole, as published, and never runs code from its files."""
import re

import numpy as np
import pytest

from aeserve.models.checkpoint import WEIGHTS, CheckpointError, load_version
from aeserve.training.trainer import train
from tests.conftest import digits_run, tamper_version


@pytest.fixture
def published(registry):
    train(digits_run("digits", "pca", report=False), registry, progress=False)
    return registry


def load(published):
    return load_version(published.version_dir("digits", 1))


def test_a_version_loads_as_it_was_published(published):
    version = load(published)
    assert (version.name, version.version, version.code_dim, version.input_shape) == ("digits", 1, 4, (8, 8))
    assert version.folder == published.version_dir("digits", 1)
    manifest = published.manifest("digits")
    np.testing.assert_array_equal(version.anomaly.quantiles, manifest["metrics"]["score_quantiles"])
    combined = version.anomaly.method
    assert manifest["anomaly"]["score"] == "combined" and version.anomaly.needs == "feature_error"
    assert (combined.code_mean.shape, combined.code_whiten.shape, combined.residual_weight.shape) == ((4,), (4, 4), (64,))


def test_sha256_mismatch_is_refused(published):
    weights = published.version_dir("digits", 1) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights.safetensors: sha256 [0-9a-f]{64} does not match the manifest's"):
        load(published)


def _rewrite(published, weights: bytes | None = None, **manifest_changes):
    tamper_version(published, "digits", weights, **manifest_changes)


def test_corrupted_weights_file_is_refused(published):
    _rewrite(published, weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load(published)


def test_truncated_weights_file_is_refused(published):
    data = (published.version_dir("digits", 1) / WEIGHTS).read_bytes()
    _rewrite(published, weights=data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load(published)


def test_pickle_in_place_of_weights_is_refused(published):
    import pickle  # the test builds a hostile file; the product never loads pickles
    _rewrite(published, weights=pickle.dumps({"a": np.zeros(3)}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load(published)


def test_manifest_shapes_that_do_not_match_the_weights_are_refused(published):
    _rewrite(published, config={"code_dim": 5})
    with pytest.raises(CheckpointError, match=r"tensors do not match the manifest's model .*wrong shape \['model.components'"):
        load(published)


@pytest.mark.parametrize(("change", "reason"), [
    ({"code_dim": 7}, "code_dim 7 but the model config gives 4"),
    ({"input_shape": [64]}, "input_shape [64] but the model config gives [8, 8]"),
])
def test_manifest_facts_that_contradict_the_model_are_refused(published, change, reason):
    _rewrite(published, **change)
    with pytest.raises(CheckpointError, match=re.escape(f"the manifest contradicts itself: {reason}")):
        load(published)


def test_absurd_sizes_and_unknown_kinds_are_refused_without_allocating(published):
    _rewrite(published, config={"code_dim": 10**12})
    with pytest.raises(CheckpointError, match="tensors do not match"):
        load(published)
    _rewrite(published, kind="transformer")
    with pytest.raises(CheckpointError, match="unknown model kind 'transformer'"):
        load(published)
