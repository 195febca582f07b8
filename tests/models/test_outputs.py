"""Anomaly percentiles: linear between the held-out quantiles, and still ordered beyond the largest held-out error."""
import json

import numpy as np
import pytest

from aeserve.models.checkpoint import MANIFEST
from aeserve.models.outputs import percentiles
from aeserve.training.trainer import train
from tests.conftest import digits_run

QUANTILES = np.arange(11, dtype=np.float64)  # held-out errors 0..10 at 0, 10, ..., 100 percent


def test_inside_the_held_out_range_percentiles_interpolate_between_quantiles():
    got = percentiles(QUANTILES, np.array([-1.0, 0.0, 0.5, 5.0, 7.25, 10.0]))
    # The grid runs 0 .. 99.9 in steps of 9.99; the last 0.1 is kept for errors beyond every held-out one.
    np.testing.assert_allclose(got, [0.0, 0.0, 4.995, 49.95, 72.4275, 99.9], rtol=0, atol=2e-5)
    assert got.dtype == np.float32 and got.shape == (6,)


def test_beyond_the_largest_held_out_error_the_rule_is_100_minus_0_1_over_1_plus_log10_of_the_ratio():
    got = percentiles(QUANTILES, np.array([10.0, 20.0, 100.0, 1000.0, 10_000.0]))
    want = [99.9, 100 - 0.1 / (1 + np.log10(2)), 99.95, 100 - 0.1 / 3, 99.975]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("ratio", [1e2, 1e6])
def test_larger_errors_beyond_the_held_out_ones_get_strictly_larger_float32_percentiles(ratio):
    held_out = np.random.default_rng(0).chisquare(20, 1000)
    quantiles = np.quantile(held_out, np.linspace(0, 1, 1001))
    errors = quantiles[-1] * np.geomspace(1, ratio, 1000)  # neighbours 0.46 % (1e2) to 1.4 % (1e6) apart
    got = percentiles(quantiles, errors)
    assert np.all(np.diff(got) > 0)
    assert got.dtype == np.float32 and got[0] == np.float32(99.9) and got[-1] < 100


def test_percentiles_never_decrease_and_never_pass_100():
    errors = np.concatenate([np.linspace(-1, 12, 1000), [1e3, 1e30, 1e300, np.inf]])
    got = percentiles(QUANTILES, errors)
    assert np.all(np.diff(got) >= 0) and got.min() == 0 and got.max() <= 100


def test_held_out_errors_all_zero_still_answer():
    got = percentiles(np.zeros(1001), np.array([0.0, 1e-9, 1.0]))
    assert np.all(np.isfinite(got)) and got[0] <= got[1] <= got[2] <= 100


def test_a_manifest_without_the_row_count_still_loads_and_answers(registry):
    train(digits_run("old", "pca"), registry, progress=False)
    folder = registry.version_dir("old", 1)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["metrics"]["error_quantiles_rows"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    version = registry.load("old")
    # Checkerboards far brighter than any digit (pixels 0..16): codes far from every training code.
    board = np.indices((8, 8)).sum(axis=0) % 2
    far_images = (board * np.array([400.0, 800.0, 1600.0], np.float32)[:, None, None]).astype(np.float32)
    _, errors, got = version.reconstruct(far_images)
    scores = version.scores(far_images)
    np.testing.assert_array_equal(got, percentiles(np.asarray(manifest["metrics"]["score_quantiles"]), scores))
    assert got.dtype == np.float32 and got.shape == (3,)
    # Unlike any digit: all three lie beyond every held-out score, and are told apart instead of tying at 100.
    assert np.all(got > 99.9) and np.all(got < 100) and len(set(got.tolist())) == 3
    assert np.array_equal(np.argsort(got), np.argsort(scores))
