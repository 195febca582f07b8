"""A version's anomaly score, fitted when it is published: the score's fitted state, and the held-out scores its
percentiles rest on (models/anomaly.py scores rows; this module decides what they are measured against).

The score's state is fitted on the rows the version trained on: the combined score's code mean and covariance and
the residual's mean square per feature, or a neighbour score's reference set of codes.

Held-out scores are out of sample: a held-out row is scored by a model that never trained on it, against state fitted
on that model's training rows. On big data the held-out rows are the validation and test rows. On small data
(``anomaly.cross_fit_rows``) they would be few, so every row is scored instead by a model that did not train on it: the
rows are split into ``anomaly.folds`` folds, and for each fold a model of the published kind and config, trained with
the same recipe on the other folds, scores the fold. Such scores place a row among rows the scoring model never saw,
as a score served later does.

The fold models' optimiser steps are bounded (``anomaly.cross_fit_steps``): together they take at most that multiple
of the steps the published model took to the epoch it kept (half, by default), so that a cross-fit costs a fraction
of the training it calibrates rather than ``folds`` times it. Fold models so trained sit a little apart from the
version (fewer steps, other rows); their scores are put on the version's level by one factor, the ratio of the
version's median score to the fold models' over the validation and test rows, which neither trained on. How well the
percentiles then hold on rows no model saw, and what the bound saves: docs/benchmarks.md, "Anomaly scores: the
cross-fit's cost and calibration".
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from aeserve.models.anomaly import AnomalyScore, Combined, Neighbors
from aeserve.models.base import Autoencoder
from aeserve.models.checkpoint import error_quantiles
from aeserve.training.config import AnomalyParams
from aeserve.training.data.rows import ModelRows
from aeserve.training.evaluate import EVAL_BATCH, reconstruction_errors

Rows = torch.Tensor | ModelRows
Method = Combined | Neighbors | None
# Trains a model of the published kind and config on rows (n, input_dim) in model space for a number of epochs,
# seeded by the third argument.
TrainFold = Callable[[torch.Tensor, int, int], Autoencoder]


# Codes with fewer distinct rows than this share of the training rows (quantized codes, kind rd) make neighbour
# distances tie, most of them at 0: such versions score by the error, and the manifest says why.
MIN_DISTINCT_CODES = 0.5


class Fitted(NamedTuple):
    """What the score is fitted from, in one pass over the rows a model trained on: their codes (n, code_dim) float64,
    the mean squared residual of each feature (input_dim,) float64 and the mean variance of the inputs' features."""

    codes: np.ndarray
    residual_mean_square: np.ndarray
    input_variance: float


@torch.inference_mode()
def training_statistics(model: Autoencoder, rows: Rows) -> Fitted:
    """Codes and residual statistics of rows (n, input_dim) in model space, EVAL_BATCH rows at a time: the residual
    as served, x - decode(encode(x))."""
    model.eval()
    codes, squared, total, total_squared = [], 0.0, 0.0, 0.0
    for start in range(0, len(rows), EVAL_BATCH):
        x = rows[start:start + EVAL_BATCH]
        z = model.encode(x)
        codes.append(z.double())
        squared = squared + (model.decode(z) - x).double().square().sum(dim=0)
        total, total_squared = total + x.double().sum(dim=0), total_squared + x.double().square().sum(dim=0)
    n = max(len(rows), 1)
    variance = (total_squared / n - (total / n) ** 2).clamp(min=0).mean() if len(rows) else torch.zeros(())
    codes = torch.cat(codes).numpy() if codes else np.zeros((0, model.code_dim))
    return Fitted(codes, (squared / n).numpy() if len(rows) else np.zeros(model.input_dim), float(variance))


def fit_method(params: AnomalyParams, fitted: Fitted, seed: int) -> Method:
    """The score's fitted state from a model's training rows' statistics (None where the score is the error)."""
    if params.score == "combined":
        return Combined.fit(fitted.codes, fitted.residual_mean_square, fitted.input_variance)
    if params.score == "neighbors":
        return Neighbors.fit(fitted.codes, params.k, params.reference_rows, seed)
    return None


def score_for(params: AnomalyParams, training_codes: np.ndarray) -> tuple[AnomalyParams, str | None]:
    """The settings to score with, and why they differ from ``params`` (None when they do not)."""
    if params.score == "neighbors" and len(np.unique(training_codes, axis=0)) < MIN_DISTINCT_CODES * len(training_codes):
        return dataclasses.replace(params, score="error"), "the codes take few distinct values, so neighbour distances would tie"
    return params, None


@torch.inference_mode()
def scores_of(model: Autoencoder, method: Method, rows: Rows) -> np.ndarray:
    """Anomaly scores (n,) float64 of rows (n, input_dim) in model space: as models/anomaly.py serves them."""
    if method is None:
        return reconstruction_errors(model, rows)
    model.eval()
    anomaly, chunks = AnomalyScore(np.zeros(2), method), []
    for start in range(0, len(rows), EVAL_BATCH):
        x = rows[start:start + EVAL_BATCH]
        z = model.encode(x)
        feature_errors = (model.decode(z) - x).square().numpy() if anomaly.needs == "feature_error" else None
        chunks.append(anomaly.scores(z.numpy(), None, feature_errors))
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)


def fold_epochs(params: AnomalyParams, published_steps: int, fold_rows: int, batch_size: int, epochs: int) -> int:
    """The epochs each fold model trains: the published model's ``epochs``, or fewer where the fold models' share of
    ``params.cross_fit_steps`` x ``published_steps`` runs out first (at least one)."""
    if not params.cross_fit_steps:
        return epochs
    steps_per_epoch = math.ceil(fold_rows / batch_size)
    share = params.cross_fit_steps * published_steps / params.folds
    return max(1, min(epochs, int(share // steps_per_epoch)))


def cross_fitted_scores(params: AnomalyParams, rows: torch.Tensor, train_fold: TrainFold, epochs: int, seed: int,
                        progress: bool) -> np.ndarray:
    """Out-of-sample scores (n,) float64 of every row (n, input_dim): each by a model trained on the other folds for
    ``epochs`` epochs, against state fitted on that model's training rows."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(rows)), params.folds)
    scores = np.zeros(len(rows))
    for i, fold in enumerate(folds):
        if progress:
            print(f"anomaly percentiles: cross-fit fold {i + 1}/{len(folds)}", file=sys.stderr)
        rest = rows[torch.from_numpy(np.setdiff1d(np.arange(len(rows)), fold))]
        model = train_fold(rest, epochs, seed + 1 + i)
        model.eval()
        scores[fold] = scores_of(model, fit_method(params, training_statistics(model, rest), seed), rows[torch.from_numpy(fold)])
    return scores


def fit_anomaly(model: Autoencoder, params: AnomalyParams, training_rows: Rows, held_out: list[Rows], train_fold: TrainFold | None,
                steps: tuple[int, int, int], seed: int, progress: bool = True) -> tuple[AnomalyScore, dict[str, Any], dict[str, Any]]:
    """(the version's score with its held-out quantiles, the manifest's ``anomaly`` section, metrics to add:
    ``score_quantiles`` and ``score_quantiles_rows``) for a trained ``model``.

    ``training_rows``: the rows it trained on, in model space; ``held_out``: the rows it did not train on (validation,
    test). Every row is cross-fitted when there are at most ``params.cross_fit_rows`` of them and ``train_fold`` is
    given (None: no cross-fit, for data-parallel runs and sampled rows). ``steps``: (the epochs the published model
    kept, its optimiser steps to them, its batch size), which bound the fold models'.
    """
    fitted = training_statistics(model, training_rows)
    params, why = score_for(params, fitted.codes)
    method = fit_method(params, fitted, seed)
    held_out_scores = np.concatenate([scores_of(model, method, rows) for rows in held_out])
    n_rows = len(held_out_scores) + len(training_rows)
    cross_fit = None
    if train_fold is not None and 0 < n_rows <= params.cross_fit_rows:
        # A neighbour score's fold reference sets as big as the version's: a k-th neighbour's distance shrinks as the
        # reference grows denser, so scores against references of other sizes would not be comparable.
        folds = dataclasses.replace(params, reference_rows=len(method.reference)) if isinstance(method, Neighbors) else params
        epochs_kept, published_steps, batch_size = steps
        epochs = fold_epochs(params, published_steps, n_rows - n_rows // params.folds, batch_size, epochs_kept)
        rows = torch.cat([part.tensor() if isinstance(part, ModelRows) else part for part in [*held_out, training_rows]])
        scores = cross_fitted_scores(folds, rows, train_fold, epochs, seed, progress)
        # Fold models train fewer steps on other rows than the version, so their scores sit at another level: they are
        # put on the version's by the ratio of the two models' median scores over the rows neither trained on (the
        # validation and test rows come first in ``rows``).
        theirs = float(np.median(scores[:len(held_out_scores)])) if len(held_out_scores) else 0.0
        scale = float(np.median(held_out_scores)) / theirs if theirs > 0 and np.isfinite(theirs) else 1.0
        scores = scores * scale
        how = f"{params.folds}-fold cross-fit over {n_rows} rows"
        cross_fit = {"fold_epochs": epochs, "published_epochs": epochs_kept, "scale": scale, "scale_rows": len(held_out_scores)}
    else:
        scores, how = held_out_scores, "validation and test rows"
    section: dict[str, Any] = AnomalyScore(np.zeros(2), method).section()
    if isinstance(method, Combined):
        section.update({"formula": "(T2 / code_dim + sum_j residual_j^2 * residual_weight_j / input_dim) / 2",
                        "reference_rows": int(len(fitted.codes))})
    elif isinstance(method, Neighbors):
        section.update({"space": "standardized codes"})
    if method is not None:
        section["tensors"] = [*method.tensors()]
    section.update({"held_out_rows": int(len(scores)), "held_out": how, **({"cross_fit": cross_fit} if cross_fit else {}),
                    **({"why": why} if why else {})})
    quantiles = error_quantiles(scores)
    return AnomalyScore(np.asarray(quantiles), method), section, {"score_quantiles": quantiles, "score_quantiles_rows": int(len(scores))}
