"""A version's anomaly score: the neighbour distance by hand, the reference set it keeps, the held-out and cross-fitted
scores its percentiles rest on, and versions published before scores existed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aeserve.models.anomaly import AnomalyScore, Neighbors
from aeserve.models.checkpoint import MANIFEST, N_QUANTILES, WEIGHTS, CheckpointError, load_version
from aeserve.models.outputs import percentiles
from aeserve.models.pca import PCA, PCAConfig
from aeserve.models.registry import Registry
from aeserve.training.anomaly import cross_fitted_scores
from aeserve.training.config import AnomalyParams, build_run_config
from aeserve.training.data.sources import load_dataset
from aeserve.training.trainer import split_validation, train
from tests.conftest import digits_run, tamper_version

BEFORE_SCORES = Path(__file__).parents[1] / "fixtures" / "registry-before-scores"


def test_a_hand_built_reference_set_gives_the_mean_distance_to_the_k_nearest():
    # Reference rows on a line, a standardized space with mean (1, 0) and scale (2, 1): the code (3, 0) is (1, 0) there.
    reference = np.array([[0, 0], [1, 0], [3, 0], [6, 0], [1, 4]], np.float32)
    neighbors = Neighbors(reference, np.array([1, 0], np.float32), np.array([2, 1], np.float32), k=2)
    got = neighbors.scores(np.array([[3, 0], [1, 0], [1, 8]], np.float32))
    # Standardized, the queries are (1, 0), (0, 0) and (0, 8): nearest distances 0 and 1, 0 and 1, then sqrt(17) from
    # [1, 4] and 8 from [0, 0].
    np.testing.assert_allclose(got, [0.5, 0.5, (np.sqrt(17) + 8) / 2], rtol=1e-6)
    assert got.dtype == np.float32


def test_the_search_is_exact_and_blocked_as_brute_force_in_float64():
    rng = np.random.default_rng(0)
    codes, queries = rng.normal(size=(700, 6)), rng.normal(size=(1300, 6)) * 1.5  # more queries than one block
    neighbors = Neighbors.fit(codes, k=5, reference_rows=700, seed=0)
    z = (queries - codes.mean(axis=0)) / codes.std(axis=0)
    distances = np.sqrt(((z[:, None, :] - neighbors.reference[None].astype(np.float64)) ** 2).sum(axis=2))
    np.testing.assert_allclose(neighbors.scores(queries), np.sort(distances, axis=1)[:, :5].mean(axis=1), rtol=1e-5)


def test_fitting_standardizes_samples_with_the_seed_and_gives_a_constant_dimension_scale_1():
    rng = np.random.default_rng(1)
    codes = np.column_stack([rng.normal(3.0, 2.0, 500), np.full(500, 7.0)])
    neighbors = Neighbors.fit(codes, k=5, reference_rows=100, seed=4)
    np.testing.assert_allclose(neighbors.mean, [codes[:, 0].mean(), 7.0], rtol=1e-6)
    np.testing.assert_allclose(neighbors.scale, [codes[:, 0].std(), 1.0], rtol=1e-6)
    rows = np.sort(np.random.default_rng(4).choice(500, size=100, replace=False))
    np.testing.assert_allclose(neighbors.reference, (codes[rows] - neighbors.mean) / neighbors.scale, rtol=1e-5, atol=1e-6)
    assert Neighbors.fit(codes[:3], k=5, reference_rows=100, seed=4).k == 3  # never more neighbours than rows


def test_a_training_rows_duplicate_scores_low_and_an_outlier_high(registry):
    train(digits_run("digits", "mlp"), registry, progress=False)
    version = registry.load("digits")
    data = load_dataset(build_run_config({"name": "d", "data": {"source": "digits", "limit": 400}}).data)
    training_rows = data.train_x[:50]
    outliers = training_rows + np.float32(40.0) * (np.indices((8, 8)).sum(axis=0) % 2)  # checkerboards far beyond 0..16
    duplicates, unusual = version.scores(training_rows), version.scores(outliers)
    held_out = np.asarray(version.manifest["metrics"]["score_quantiles"])
    assert np.median(duplicates) < held_out[N_QUANTILES // 2] and unusual.min() > held_out[-1]
    _, errors, got = version.reconstruct(outliers)
    np.testing.assert_array_equal(got, percentiles(held_out, unusual))
    assert np.all(got > 99.9) and np.all(got < 100)


def test_held_out_scores_are_the_validation_and_test_rows_against_training_codes(registry):
    config = digits_run("digits", "pca", anomaly={"cross_fit_rows": 0, "reference_rows": 100})
    train(config, registry, progress=False)
    version, manifest = registry.load("digits"), registry.manifest("digits")
    data = load_dataset(config.data)
    _, val_index = split_validation(len(data.train_x), config.data.val_fraction, config.train.seed)
    held_out = np.concatenate([version.scores(data.train_x[val_index.numpy()]), version.scores(data.test_x)]).astype(np.float64)
    np.testing.assert_allclose(manifest["metrics"]["score_quantiles"], np.quantile(held_out, np.linspace(0, 1, N_QUANTILES)), rtol=1e-5)
    assert manifest["anomaly"] == {"score": "neighbors", "k": 5, "space": "standardized codes", "reference_rows": 100,
                                   "tensors": ["anomaly.reference", "anomaly.mean", "anomaly.scale"],
                                   "held_out_rows": len(held_out), "held_out": "validation and test rows"}
    assert manifest["metrics"]["score_quantiles_rows"] == len(held_out) == 40 + 180


def test_each_cross_fitted_row_is_scored_by_a_model_that_did_not_train_on_it():
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(53, 6)).astype(np.float32))
    trained_on = []

    def train_fold(fold_rows: torch.Tensor, seed: int) -> PCA:
        trained_on.append({tuple(r) for r in fold_rows.tolist()})
        pca = PCA(PCAConfig(code_dim=3), (6,))
        pca.prepare(fold_rows)
        return pca

    scores = cross_fitted_scores(AnomalyParams(folds=4), rows, train_fold, seed=0, progress=False)
    assert len(trained_on) == 4 and sorted(len(t) for t in trained_on) == [39, 40, 40, 40]
    every = [tuple(r) for r in rows.tolist()]
    assert all(sum(row not in t for t in trained_on) == 1 for row in every)  # each row left out of exactly one fold
    assert scores.shape == (53,) and np.all(scores > 0)  # no row found itself among its neighbours


def test_small_data_gets_percentiles_over_every_row_and_error_scores_when_asked(registry):
    config = digits_run("small", "mlp", anomaly={})  # the defaults: 580 rows are cross-fitted
    data = load_dataset(config.data)
    train(config, registry, progress=False)
    anomaly = registry.manifest("small")["anomaly"]
    n = len(data.train_x) + len(data.test_x)
    assert (anomaly["held_out_rows"], anomaly["held_out"]) == (n, f"5-fold cross-fit over {n} rows")
    assert registry.manifest("small")["metrics"]["score_quantiles_rows"] == n

    by_error = dataclasses.replace(config, name="by-error", anomaly=AnomalyParams(score="error", cross_fit_rows=0))
    train(by_error, registry, progress=False)
    manifest, version = registry.manifest("by-error"), registry.load("by-error")
    assert manifest["anomaly"] == {"score": "error", "held_out_rows": 220, "held_out": "validation and test rows"}
    assert manifest["metrics"]["score_quantiles"] == manifest["metrics"]["error_quantiles"]
    _, errors, got = version.reconstruct(data.test_x[:5])
    np.testing.assert_array_equal(version.scores(data.test_x[:5]), errors)
    np.testing.assert_array_equal(got, percentiles(np.asarray(manifest["metrics"]["error_quantiles"]), errors))


def test_anomaly_settings_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"anomaly.score 'isolation' is not one of \['error', 'neighbors'\]"):
        build_run_config({"name": "x", "anomaly": {"score": "isolation"}})
    with pytest.raises(ValueError, match=r"anomaly.folds must be >= 2, got 1"):
        build_run_config({"name": "x", "anomaly": {"folds": 1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['anomaly.neighbours'\]"):
        build_run_config({"name": "x", "anomaly": {"neighbours": 5}})


def test_a_reference_set_that_does_not_match_the_manifest_is_refused(registry):
    train(digits_run("digits", "pca"), registry, progress=False)
    anomaly = registry.manifest("digits")["anomaly"]
    tamper_version(registry, "digits", anomaly={**anomaly, "reference_rows": anomaly["reference_rows"] + 1})
    with pytest.raises(CheckpointError, match=r"wrong shape \['anomaly.reference'\]"):
        registry.load("digits")


def test_a_version_published_before_scores_serves_its_errors_as_scores_with_its_old_percentiles():
    folder = BEFORE_SCORES / "digits-old" / "1"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "anomaly" not in manifest and "score_quantiles" not in manifest["metrics"]  # as the previous release wrote it
    version = load_version(folder)
    assert version.anomaly == AnomalyScore(version.anomaly.quantiles, None)
    np.testing.assert_array_equal(version.anomaly.quantiles, manifest["metrics"]["error_quantiles"])
    x = load_dataset(build_run_config({"name": "d", "data": {"source": "digits", "limit": 300}}).data).test_x[:20]
    _, errors, got = version.reconstruct(x)
    np.testing.assert_array_equal(version.scores(x), errors)
    np.testing.assert_array_equal(got, percentiles(np.asarray(manifest["metrics"]["error_quantiles"]), errors))
    assert (folder / WEIGHTS).stat().st_size < 4096 and Registry(BEFORE_SCORES).versions("digits-old") == [1]
