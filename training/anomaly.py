"""A version's anomaly score, fitted when it is published: the reference set, and the held-out scores its
percentiles rest on (models/anomaly.py scores rows; this module decides what they are measured against).

Held-out scores are out of sample: a held-out row is scored against a reference set of training rows only. On big
data the held-out rows are the validation and test rows. On small data (``anomaly.cross_fit_rows``) they would be few,
so every row is scored instead by a model that did not train on it: the rows are split into ``anomaly.folds`` folds,
and for each fold a model of the published kind and config, trained with the same recipe for as many epochs as the
published model kept, on the other folds, scores the fold against a reference set of its own training codes. Such
scores place a row among rows the scoring model never saw, as a score served later does.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from aeserve.models.anomaly import Neighbors
from aeserve.models.base import Autoencoder
from aeserve.models.checkpoint import error_quantiles
from aeserve.training.config import AnomalyParams
from aeserve.training.data.rows import ModelRows
from aeserve.training.evaluate import encode_all, reconstruction_errors

Rows = torch.Tensor | ModelRows
# Trains a model of the published kind and config on rows (n, input_dim) in model space, seeded by the second argument.
TrainFold = Callable[[torch.Tensor, int], Autoencoder]


# Codes with fewer distinct rows than this share of the training rows (quantized codes, kind rd) make neighbour
# distances tie, most of them at 0: such versions score by the error, and the manifest says why.
MIN_DISTINCT_CODES = 0.5


def fit_neighbors(params: AnomalyParams, training_codes: np.ndarray, seed: int) -> Neighbors | None:
    """The reference set from training codes (n, code_dim), or None where the score is the error."""
    return Neighbors.fit(training_codes, params.k, params.reference_rows, seed) if params.score == "neighbors" else None


def score_for(params: AnomalyParams, training_codes: np.ndarray) -> tuple[AnomalyParams, str | None]:
    """The settings to score with, and why they differ from ``params`` (None when they do not)."""
    if params.score == "neighbors" and len(np.unique(training_codes, axis=0)) < MIN_DISTINCT_CODES * len(training_codes):
        return dataclasses.replace(params, score="error"), "the codes take few distinct values, so neighbour distances would tie"
    return params, None


def scores_of(model: Autoencoder, neighbors: Neighbors | None, rows: Rows) -> np.ndarray:
    """Anomaly scores (n,) float64 of rows (n, input_dim) in model space: as models/anomaly.py serves them."""
    if neighbors is None:
        return reconstruction_errors(model, rows)
    return neighbors.scores(encode_all(model, rows).numpy()).astype(np.float64)


def cross_fitted_scores(params: AnomalyParams, rows: torch.Tensor, train_fold: TrainFold, seed: int, progress: bool) -> np.ndarray:
    """Out-of-sample scores (n,) float64 of every row (n, input_dim): each by a model trained on the other folds."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(rows)), params.folds)
    scores = np.zeros(len(rows))
    for i, fold in enumerate(folds):
        if progress:
            print(f"anomaly percentiles: cross-fit fold {i + 1}/{len(folds)}", file=sys.stderr)
        rest = torch.from_numpy(np.setdiff1d(np.arange(len(rows)), fold))
        model = train_fold(rows[rest], seed + 1 + i)
        model.eval()
        neighbors = fit_neighbors(params, encode_all(model, rows[rest]).numpy(), seed)
        scores[fold] = scores_of(model, neighbors, rows[torch.from_numpy(fold)])
    return scores


def fit_anomaly(model: Autoencoder, params: AnomalyParams, training_codes: np.ndarray, held_out: list[Rows], all_rows: list[Rows],
                train_fold: TrainFold | None, seed: int, progress: bool = True) -> tuple[Neighbors | None, dict[str, Any], dict[str, Any]]:
    """(the reference set or None, the manifest's ``anomaly`` section, metrics to add: ``score_quantiles`` and
    ``score_quantiles_rows``) for a trained ``model``.

    ``training_codes`` (n, code_dim): the codes of the rows it trained on; ``held_out``: the rows it did not train on
    (validation, test); ``all_rows``: every row, cross-fitted when there are at most ``params.cross_fit_rows`` of them
    and ``train_fold`` is given (None: no cross-fit, for data-parallel runs).
    """
    params, why = score_for(params, training_codes)
    neighbors = fit_neighbors(params, training_codes, seed)
    n_rows = sum(len(rows) for rows in all_rows)
    if train_fold is not None and 0 < n_rows <= params.cross_fit_rows:
        # The fold models' reference sets as big as the version's: a k-th neighbour's distance shrinks as the reference
        # grows denser, so scores against references of other sizes would not be comparable.
        folds = params if neighbors is None else dataclasses.replace(params, reference_rows=len(neighbors.reference))
        scores = cross_fitted_scores(folds, torch.cat([rows.tensor() if isinstance(rows, ModelRows) else rows for rows in all_rows]),
                                     train_fold, seed, progress)
        how = f"{params.folds}-fold cross-fit over {n_rows} rows"
    else:
        scores = np.concatenate([scores_of(model, neighbors, rows) for rows in held_out])
        how = "validation and test rows"
    section: dict[str, Any] = {"score": params.score}
    if neighbors is not None:
        section.update({"k": neighbors.k, "space": "standardized codes", "reference_rows": len(neighbors.reference),
                        "tensors": [*neighbors.tensors()]})
    section.update({"held_out_rows": int(len(scores)), "held_out": how, **({"why": why} if why else {})})
    return neighbors, section, {"score_quantiles": error_quantiles(scores), "score_quantiles_rows": int(len(scores))}
