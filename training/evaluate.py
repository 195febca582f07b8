"""Held-out metrics every manifest carries, and the closed-form PCA baseline they are compared with."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aeserve.models.base import Autoencoder
from aeserve.models.checkpoint import error_quantiles
from aeserve.models.pca import PCA, PCAConfig

EVAL_BATCH = 4096


@torch.inference_mode()
def reconstruction_errors(model: Autoencoder, x: torch.Tensor) -> np.ndarray:
    """Summed squared error per example: x (n, input_dim) float32 in model space -> (n,) float64."""
    model.eval()
    chunks = [(model(x[i:i + EVAL_BATCH]) - x[i:i + EVAL_BATCH]).pow(2).sum(dim=1) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(chunks).double().numpy() if chunks else np.zeros(0)


def pca_baseline(x_train: torch.Tensor, code_dim: int) -> PCA:
    """Closed-form PCA with the same code size, fitted on the same training data."""
    pca = PCA(PCAConfig(code_dim=min(code_dim, *x_train.shape)), (x_train.shape[1],))
    pca.prepare(x_train)
    return pca


def held_out_metrics(model: Autoencoder, x_train: torch.Tensor, x_test: torch.Tensor, x_val: torch.Tensor | None = None) -> dict[str, Any]:
    """The metrics block of a manifest. Inputs (n, input_dim) are in model space ([0, 1]).

    The anomaly percentiles' quantiles come from every held-out row, validation and test together (never a
    training row), so that they rest on more rows than the test split alone; ``error_quantiles_rows`` says how many.
    """
    errors = reconstruction_errors(model, x_test)
    val_errors = reconstruction_errors(model, x_val) if x_val is not None else np.zeros(0)
    pca_errors = reconstruction_errors(pca_baseline(x_train, model.code_dim), x_test)
    input_dim = x_test.shape[1]
    test_sq_err = float(errors.mean())
    pca_sq_err = float(pca_errors.mean())
    held_out = np.concatenate([val_errors, errors])
    metrics = {
        "test_sq_err": test_sq_err,
        "test_mse": test_sq_err / input_dim,
        "pca_sq_err": pca_sq_err,
        "pca_mse": pca_sq_err / input_dim,
        "ratio_to_pca": test_sq_err / pca_sq_err if pca_sq_err > 0 else None,
        "n_test": int(len(x_test)),
        "error_quantiles": error_quantiles(held_out),
        "error_quantiles_rows": int(len(held_out)),
    }
    if len(val_errors):
        metrics["val_sq_err"] = float(val_errors.mean())
    return metrics


def map_metrics(train_coords: np.ndarray, train_labels: np.ndarray | None, test_inputs: np.ndarray, test_coords: np.ndarray,
                test_labels: np.ndarray | None, max_points: int = 10_000) -> dict[str, float]:
    """How well the 2-D map keeps neighbours, for held-out points placed by the stored projector.

    - map_knn5_accuracy: a 5-nearest-neighbour classifier fitted on the training points' coordinates,
      scored on the held-out points' labels (only with labels);
    - map_trustworthiness: scikit-learn's trustworthiness (k=5) of the held-out coordinates against
      the held-out inputs (n, input_dim) in model space.
    """
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    n = min(len(test_inputs), max_points)
    metrics = {}
    if n > 6:
        metrics["map_trustworthiness"] = float(trustworthiness(test_inputs[:n], test_coords[:n], n_neighbors=5))
    if train_labels is not None and test_labels is not None and len(train_coords) >= 5:
        classifier = KNeighborsClassifier(n_neighbors=5).fit(train_coords, train_labels)
        metrics["map_knn5_accuracy"] = float(classifier.score(test_coords[:n], test_labels[:n]))
    return metrics
