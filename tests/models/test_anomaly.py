"""A version's anomaly score: the combined score and the neighbour distance by hand, the state each keeps, the held-out
and cross-fitted scores its percentiles rest on (the fold models' steps bounded), and versions published before scores
existed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aeserve.models.anomaly import EXACT, RESIDUAL_FLOOR, AnomalyScore, Combined, Neighbors
from aeserve.models.checkpoint import MANIFEST, N_QUANTILES, WEIGHTS, CheckpointError, load_version
from aeserve.models.outputs import Call, percentiles
from aeserve.models.pca import PCA, PCAConfig
from aeserve.models.registry import Registry
from aeserve.training import anomaly as training_anomaly
from aeserve.training.anomaly import cross_fitted_scores, fold_epochs, scores_of, training_statistics
from aeserve.training.config import AnomalyParams, build_run_config
from aeserve.training.data.sources import load_dataset
from aeserve.training.trainer import split_validation, train
from tests.conftest import digits_run, tamper_version

BEFORE_SCORES = Path(__file__).parents[1] / "fixtures" / "registry-before-scores"


def test_hand_set_statistics_give_the_combined_score_exactly():
    # Codes of mean (1, 0) whose whitening halves the first dimension (variance 4) and keeps the second (variance 1);
    # residual weights 1 / (2, 0.5, 1): the score is (T2 / 2 + sum_j r_j^2 w_j / 3) / 2.
    combined = Combined(np.array([1, 0], np.float32), np.diag([0.5, 1.0]).astype(np.float32), np.array([0.5, 2.0, 1.0], np.float32))
    codes = np.array([[1, 0], [3, 0], [1, -2]], np.float32)
    feature_errors = np.array([[0, 0, 0], [2, 0.5, 1], [0, 3, 0]], np.float32)
    # T2: 0, (2 / 2)^2 = 1, 2^2 = 4; weighted residuals: 0, 1 + 1 + 1 = 3, 6.
    np.testing.assert_allclose(combined.scores(codes, feature_errors), [0.0, (1 / 2 + 3 / 3) / 2, (4 / 2 + 6 / 3) / 2], rtol=1e-6)
    assert combined.scores(codes, feature_errors).dtype == np.float32
    score = AnomalyScore(np.linspace(0, 1, 5), combined)
    assert score.needs == "feature_error" and score.section() == {"score": "combined"}
    np.testing.assert_array_equal(score.scores(codes, None, feature_errors), combined.scores(codes, feature_errors))


def test_fitted_statistics_are_hotellings_t2_and_the_residual_per_feature_each_averaging_1_on_the_training_rows():
    rng = np.random.default_rng(2)
    codes = rng.normal(size=(800, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]]) + [1.0, -2.0, 0.5]
    residuals = rng.normal(size=(800, 4)) * [0.1, 0.3, 0.2, 0.25]  # no feature below RESIDUAL_FLOOR of the mean
    combined = Combined.fit(codes, np.square(residuals).mean(axis=0), input_variance=1.0)
    centred = codes - codes.mean(axis=0)
    t2 = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(np.cov(codes, rowvar=False, bias=True)), centred)
    code_term, residual_term = combined.terms(codes, np.square(residuals))
    np.testing.assert_allclose(code_term, t2 / 3, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(residual_term, (np.square(residuals) / np.square(residuals).mean(axis=0)).sum(axis=1) / 4, rtol=1e-4)
    assert abs(code_term.mean() - 1) < 1e-3 and abs(residual_term.mean() - 1) < 1e-3


def test_directions_the_training_rows_do_not_vary_in_are_floored():
    rng = np.random.default_rng(3)
    codes = np.column_stack([rng.normal(size=500), np.full(500, 2.0)])  # a code dimension that never varies
    combined = Combined.fit(codes, np.array([0.04, 0.0, 0.02]), input_variance=1.0)  # a feature always reconstructed
    np.testing.assert_allclose(1 / combined.residual_weight, [0.04, RESIDUAL_FLOOR * 0.02, 0.02], rtol=1e-6)
    assert np.isfinite(combined.code_whiten).all()
    # Exact reconstructions (residuals at rounding's size): the residual term stays near 0 instead of amplifying them.
    exact = Combined.fit(codes, np.full(3, 1e-14), input_variance=1.0)
    np.testing.assert_allclose(1 / exact.residual_weight, EXACT)
    assert exact.terms(codes[:5], np.full((5, 3), 1e-14))[1].max() < 1e-7


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
    # The default score (combined); the neighbour score's version of this test is below.
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


def test_held_out_scores_are_the_validation_and_test_rows_scored_against_the_training_rows(registry):
    config = digits_run("digits", "mlp", anomaly={"cross_fit_rows": 0})
    train(config, registry, progress=False)
    version, manifest = registry.load("digits"), registry.manifest("digits")
    data = load_dataset(config.data)
    train_index, val_index = split_validation(len(data.train_x), config.data.val_fraction, config.train.seed)
    held_out = np.concatenate([version.scores(data.train_x[val_index.numpy()]), version.scores(data.test_x)]).astype(np.float64)
    np.testing.assert_allclose(manifest["metrics"]["score_quantiles"], np.quantile(held_out, np.linspace(0, 1, N_QUANTILES)), rtol=1e-5)
    assert manifest["anomaly"] == {"score": "combined", "formula": "(T2 / code_dim + sum_j residual_j^2 * residual_weight_j / input_dim) / 2",
                                   "reference_rows": 360, "tensors": ["anomaly.code_mean", "anomaly.code_whiten", "anomaly.residual_weight"],
                                   "held_out_rows": len(held_out), "held_out": "validation and test rows"}
    assert manifest["metrics"]["score_quantiles_rows"] == len(held_out) == 40 + 180
    # The state is the training rows' (the 360 rows left after validation), and each of its terms averages 1 over them.
    training_rows = data.train_x[train_index.numpy()]
    fitted = training_statistics(version.model, torch.from_numpy(version.preprocessing.to_model(training_rows)))
    np.testing.assert_allclose(version.anomaly.method.code_mean, fitted.codes.mean(axis=0), rtol=1e-4, atol=1e-6)
    codes, feature_errors = version.run(Call("inputs", ("code", "feature_error")), training_rows)
    code_term, residual_term = version.anomaly.method.terms(codes, feature_errors)
    assert abs(code_term.mean() - 1) < 0.01 and 0.9 < residual_term.mean() <= 1.0 + 1e-3  # floored features weigh less


def test_the_neighbour_score_keeps_its_reference_set_and_scores_held_out_rows_against_it(registry):
    config = digits_run("digits", "pca", anomaly={"score": "neighbors", "cross_fit_rows": 0, "reference_rows": 100})
    train(config, registry, progress=False)
    version, manifest = registry.load("digits"), registry.manifest("digits")
    data = load_dataset(config.data)
    _, val_index = split_validation(len(data.train_x), config.data.val_fraction, config.train.seed)
    held_out = np.concatenate([version.scores(data.train_x[val_index.numpy()]), version.scores(data.test_x)]).astype(np.float64)
    np.testing.assert_allclose(manifest["metrics"]["score_quantiles"], np.quantile(held_out, np.linspace(0, 1, N_QUANTILES)), rtol=1e-5)
    assert manifest["anomaly"] == {"score": "neighbors", "k": 5, "space": "standardized codes", "reference_rows": 100,
                                   "tensors": ["anomaly.reference", "anomaly.mean", "anomaly.scale"],
                                   "held_out_rows": len(held_out), "held_out": "validation and test rows"}
    assert version.anomaly.needs == "code" and version.anomaly.method.reference.shape == (100, version.code_dim)
    np.testing.assert_array_equal(version.scores(data.test_x[:9]), version.anomaly.method.scores(version.encode(data.test_x[:9])))


def test_each_cross_fitted_row_is_scored_by_a_model_that_did_not_train_on_it():
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(53, 6)).astype(np.float32))
    trained_on, epochs_given = [], []

    def train_fold(fold_rows: torch.Tensor, epochs: int, seed: int) -> PCA:
        trained_on.append({tuple(r) for r in fold_rows.tolist()})
        epochs_given.append(epochs)
        pca = PCA(PCAConfig(code_dim=3), (6,))
        pca.prepare(fold_rows)
        return pca

    for score in ("combined", "neighbors"):
        trained_on.clear()
        scores = cross_fitted_scores(AnomalyParams(score=score, folds=4), rows, train_fold, epochs=7, seed=0, progress=False)
        assert len(trained_on) == 4 and sorted(len(t) for t in trained_on) == [39, 40, 40, 40]
        every = [tuple(r) for r in rows.tolist()]
        assert all(sum(row not in t for t in trained_on) == 1 for row in every)  # each row left out of exactly one fold
        assert scores.shape == (53,) and np.all(scores > 0)  # no row found itself among its neighbours, nor fitted its own residual
    assert set(epochs_given) == {7}


def test_fold_models_share_a_step_budget_of_the_published_models_steps():
    # The published model kept epoch 150 at 25 steps an epoch: 3,750 steps. Five fold models of 400 rows at batch 16
    # (25 steps an epoch) share 0.5 x 3,750 steps by default: 375 each, 15 epochs; 1 x 3,750: 750 each, 30 epochs.
    assert fold_epochs(AnomalyParams(), published_steps=3750, fold_rows=400, batch_size=16, epochs=150) == 15
    assert fold_epochs(AnomalyParams(cross_fit_steps=1), 3750, 400, 16, 150) == 30
    assert fold_epochs(AnomalyParams(cross_fit_steps=2.5), 3750, 400, 16, 150) == 75
    assert fold_epochs(AnomalyParams(cross_fit_steps=10), 3750, 400, 16, 150) == 150  # never more than the published model's
    assert fold_epochs(AnomalyParams(cross_fit_steps=0), 3750, 400, 16, 150) == 150  # 0: no bound
    assert fold_epochs(AnomalyParams(cross_fit_steps=0.01), 3750, 400, 16, 150) == 1  # at least one epoch


def test_fold_scores_are_put_on_the_versions_level_by_the_ratio_of_medians_over_the_held_out_rows(monkeypatch):
    rng = np.random.default_rng(5)
    training_rows, held_out = (torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32)) for n in (120, 40))
    published = PCA(PCAConfig(code_dim=2), (6,))
    published.prepare(training_rows)
    every = torch.cat([held_out, training_rows])
    mine = scores_of(published, None, every)  # the error score: the version's own scores of every row
    given = {}

    def fold_scores(params, rows, train_fold, epochs, seed, progress):  # fold models scoring twice as high as the version
        given.update(rows=rows, epochs=epochs)
        return 2 * scores_of(published, None, rows)

    monkeypatch.setattr(training_anomaly, "cross_fitted_scores", fold_scores)
    score, section, metrics = training_anomaly.fit_anomaly(published, AnomalyParams(score="error"), training_rows, [held_out],
                                                           train_fold=lambda *args: published, steps=(10, 40, 32), seed=0)
    torch.testing.assert_close(given["rows"], every)  # the held-out rows first, then the training rows
    # Half of 40 published steps shared by 5 fold models of 128 rows at batch 32 (4 steps an epoch): 1 epoch each.
    assert given["epochs"] == 1 and section["cross_fit"] == {"fold_epochs": 1, "published_epochs": 10, "scale": 0.5, "scale_rows": 40}
    np.testing.assert_allclose(metrics["score_quantiles"], np.quantile(mine, np.linspace(0, 1, N_QUANTILES)), rtol=1e-12)
    assert score.quantiles.tolist() == metrics["score_quantiles"] and metrics["score_quantiles_rows"] == 160


def test_small_data_gets_percentiles_over_every_row_and_error_scores_when_asked(registry):
    config = digits_run("small", "mlp", anomaly={})  # the defaults: 580 rows are cross-fitted
    data = load_dataset(config.data)
    train(config, registry, progress=False)
    anomaly = registry.manifest("small")["anomaly"]
    n = len(data.train_x) + len(data.test_x)
    assert (anomaly["held_out_rows"], anomaly["held_out"]) == (n, f"5-fold cross-fit over {n} rows")
    # The published model kept 3 epochs of 6 steps (360 training rows at batch 64); the fold models (464 rows, 8 steps
    # an epoch) share half of those 18 steps: less than an epoch each, so one.
    assert {key: anomaly["cross_fit"][key] for key in ("fold_epochs", "published_epochs", "scale_rows")} == \
        {"fold_epochs": 1, "published_epochs": 3, "scale_rows": 40 + 180}
    assert 0.5 < anomaly["cross_fit"]["scale"] < 2
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
    with pytest.raises(ValueError, match=r"anomaly.score 'isolation' is not one of \['combined', 'error', 'neighbors'\]"):
        build_run_config({"name": "x", "anomaly": {"score": "isolation"}})
    with pytest.raises(ValueError, match=r"anomaly.folds must be >= 2, got 1"):
        build_run_config({"name": "x", "anomaly": {"folds": 1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['anomaly.neighbours'\]"):
        build_run_config({"name": "x", "anomaly": {"neighbours": 5}})


def test_fitted_state_that_does_not_match_the_manifest_is_refused(registry):
    train(digits_run("digits", "pca", anomaly={"score": "neighbors", "cross_fit_rows": 0}), registry, progress=False)
    anomaly = registry.manifest("digits")["anomaly"]
    tamper_version(registry, "digits", anomaly={**anomaly, "reference_rows": anomaly["reference_rows"] + 1})
    with pytest.raises(CheckpointError, match=r"wrong shape \['anomaly.reference'\]"):
        registry.load("digits")
    tamper_version(registry, "digits", anomaly={**anomaly, "score": "combined"})  # a neighbour score's tensors, not a combined one's
    with pytest.raises(CheckpointError, match=r"missing \['anomaly.code_mean', 'anomaly.code_whiten', 'anomaly.residual_weight'\]"):
        registry.load("digits")
    tamper_version(registry, "digits", anomaly={**anomaly, "score": "isolation"})
    with pytest.raises(CheckpointError, match=r"invalid anomaly section \(ValueError: anomaly.score 'isolation' is not one of"):
        registry.load("digits")


def test_a_version_published_before_scores_serves_its_errors_as_scores_with_its_old_percentiles():
    folder = BEFORE_SCORES / "digits-old" / "1"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "anomaly" not in manifest and "score_quantiles" not in manifest["metrics"]  # as the previous release wrote it
    version = load_version(folder)
    assert version.anomaly.method is None and version.anomaly.needs == "error"
    np.testing.assert_array_equal(version.anomaly.quantiles, manifest["metrics"]["error_quantiles"])
    x = load_dataset(build_run_config({"name": "d", "data": {"source": "digits", "limit": 300}}).data).test_x[:20]
    _, errors, got = version.reconstruct(x)
    np.testing.assert_array_equal(version.scores(x), errors)
    np.testing.assert_array_equal(got, percentiles(np.asarray(manifest["metrics"]["error_quantiles"]), errors))
    assert (folder / WEIGHTS).stat().st_size < 4096 and Registry(BEFORE_SCORES).versions("digits-old") == [1]
