"""Held-out metrics every manifest carries, and the closed-form PCA baseline they are compared with."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aeserve.models.base import Autoencoder
from aeserve.models.checkpoint import error_quantiles
from aeserve.models.pca import PCA, PCAConfig, top_components
from aeserve.training.data.rows import ModelRows

EVAL_BATCH = 4096
# Training sets up to WHOLE_ELEMENTS values (256 MB as float32) are used whole wherever a step needs every row at once
# (the model's prepare step, the map's projector); bigger ones give those steps a seeded sample of SAMPLE_ELEMENTS
# values (64 MB), recorded in the manifest as training.sample_rows. Errors and the PCA baseline stream over every row.
WHOLE_ELEMENTS = 2**26
SAMPLE_ELEMENTS = 2**24
# Held-out rows the map's neighbour metrics are scored on; 2,000 for a training set beyond WHOLE_ELEMENTS, since
# trustworthiness holds n x n distances and their ranks (10,000 rows: about 2.5 GB).
MAP_METRIC_POINTS, MAP_METRIC_POINTS_SAMPLED = 10_000, 2_000


# A version is flagged as worse than closed-form PCA when its held-out error is more than this many times PCA's: a
# PCA version fitted on the validation rows too (as a config's is) may differ from the baseline by a fraction of this.
WORSE_THAN_PCA = 1.01


def worse_than_pca(metrics: dict[str, Any]) -> bool:
    """Whether a manifest's ``metrics`` put the version's held-out error above WORSE_THAN_PCA times closed-form PCA's."""
    return bool(metrics.get("pca_sq_err")) and metrics["test_sq_err"] > WORSE_THAN_PCA * metrics["pca_sq_err"]


def bounded_sample(index: np.ndarray, input_dim: int, seed: int) -> np.ndarray:
    """``index`` (n,) itself when its rows fit in WHOLE_ELEMENTS values, else a seeded sample of it in file order."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) * input_dim <= WHOLE_ELEMENTS:
        return index
    size = max(1, SAMPLE_ELEMENTS // input_dim)
    return np.sort(np.random.default_rng(seed).choice(index, size=size, replace=False))


def map_metric_rows(test_rows: int, sampled: bool) -> int:
    """How many of ``test_rows`` held-out rows the map's neighbour metrics are scored on, ``sampled`` when the training
    rows were (``bounded_sample``)."""
    return min(test_rows, MAP_METRIC_POINTS_SAMPLED if sampled else MAP_METRIC_POINTS)


@torch.inference_mode()
def encode_all(model: Autoencoder, x: torch.Tensor | ModelRows) -> torch.Tensor:
    """Codes (n, code_dim) of inputs (n, input_dim) in model space, in chunks."""
    chunks = [model.encode(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.code_dim)


@torch.inference_mode()
def reconstruction_errors(model: Autoencoder, x: torch.Tensor | ModelRows) -> np.ndarray:
    """Summed squared error per example: x (n, input_dim) float32 in model space -> (n,) float64, EVAL_BATCH rows at a time."""
    model.eval()
    chunks = [(model(x[i:i + EVAL_BATCH]) - x[i:i + EVAL_BATCH]).pow(2).sum(dim=1) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(chunks).double().numpy() if chunks else np.zeros(0)


def pca_baseline(x_train: torch.Tensor | ModelRows, code_dim: int) -> PCA:
    """Closed-form PCA with the same code size, fitted on the same training data.

    Rows beyond WHOLE_ELEMENTS values are streamed: the d x d scatter matrix is summed EVAL_BATCH rows at a time in
    float64 (the maths of ``principal_components``, without the rows in memory at once).
    """
    pca = PCA(PCAConfig(code_dim=min(code_dim, *x_train.shape)), (x_train.shape[1],))
    if isinstance(x_train, ModelRows):
        if len(x_train) * x_train.shape[1] > WHOLE_ELEMENTS:
            mean, components = _streamed_principal_components(x_train, pca.code_dim)
            pca.mean.copy_(mean)
            pca.components.copy_(components)
            return pca
        x_train = x_train.tensor()
    pca.prepare(x_train)
    return pca


def _streamed_principal_components(rows: ModelRows, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), components (k, d)) float32 of rows (n, d), two passes in file order; signs as scikit-learn's svd_flip."""
    if rows.index is not None:
        rows = ModelRows(rows.raw, rows.preprocessing, np.sort(rows.index))  # the same rows, read front to back
    n, d = rows.shape
    total = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, EVAL_BATCH):
        total += rows[i:i + EVAL_BATCH].double().sum(dim=0)
    mean = total / n
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, EVAL_BATCH):
        centred = rows[i:i + EVAL_BATCH].double() - mean
        scatter += centred.T @ centred
    return mean.float(), top_components(scatter, k).float()


def held_out_metrics(model: Autoencoder, x_train: torch.Tensor | ModelRows, x_test: torch.Tensor | ModelRows,
                     x_val: torch.Tensor | ModelRows | None = None) -> dict[str, Any]:
    """The metrics block of a manifest. Inputs (n, input_dim) are in model space, tensors or rows scaled per chunk.

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
    if n > 2 * 5:  # scikit-learn's trustworthiness needs k < n / 2
        metrics["map_trustworthiness"] = float(trustworthiness(test_inputs[:n], test_coords[:n], n_neighbors=5))
    if train_labels is not None and test_labels is not None and len(train_coords) >= 5:
        classifier = KNeighborsClassifier(n_neighbors=5).fit(train_coords, train_labels)
        metrics["map_knn5_accuracy"] = float(classifier.score(test_coords[:n], test_labels[:n]))
    return metrics


# Linear probe (the lecture's third use: codes as features for a supervised task). Logistic regression on standardized
# features, lbfgs stopped after PROBE_MAX_ITER iterations: a bounded cost on big training sets.
PROBE_PER_CLASS = 100
PROBE_MAX_ITER = 200
PROBE_SETTINGS = f"logistic regression (scikit-learn, lbfgs, C=1, max_iter {PROBE_MAX_ITER}) on standardized features"


def per_class_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices (m,) of ``per_class`` seeded random rows of each class in ``labels`` (n,); all rows of a smaller class."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(rows, size=min(per_class, len(rows)), replace=False)
              for rows in (np.flatnonzero(labels == label) for label in np.unique(labels))]
    return np.sort(np.concatenate(chosen))


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression (PROBE_SETTINGS) fitted on (train_x (n, d), train_y (n,))."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # stopping at PROBE_MAX_ITER is the setting, said in the output
        classifier = LogisticRegression(max_iter=PROBE_MAX_ITER).fit(scaler.transform(train_x), train_y)
    return float(classifier.score(scaler.transform(test_x), test_y))


@torch.inference_mode()
def _codes(model: Autoencoder, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model.encode(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]).numpy()


def linear_probe(model: Autoencoder, x_train: torch.Tensor, train_y: np.ndarray | None, x_test: torch.Tensor,
                 test_y: np.ndarray | None, seed: int = 0) -> dict[str, Any] | None:
    """Codes as features: test accuracy of a linear probe on the model's codes, on PCA codes of the same size (fitted on
    the same training rows) and on the inputs themselves, each trained on PROBE_PER_CLASS labelled rows per class and
    on every labelled training row. x_train (n, input_dim) and x_test (m, input_dim) float32 in model space; labels
    (n,) and (m,) integer classes.

    Returns {"settings", "per_class": PROBE_PER_CLASS, "rows": {"per_class", "all", "test"}, "features": {name: {"dims",
    "per_class", "all"}}} (accuracies in "per_class" and "all"), or
    None without integer labels in two or more classes. Sets beyond WHOLE_ELEMENTS values are a seeded sample
    (``bounded_sample``); ``rows`` says how many were used.
    """
    if train_y is None or test_y is None:
        return None
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if not np.issubdtype(train_y.dtype, np.integer) or len(np.unique(train_y)) < 2:
        return None
    train_rows = bounded_sample(np.arange(len(x_train)), x_train.shape[1], seed)
    test_rows = bounded_sample(np.arange(len(x_test)), x_test.shape[1], seed)
    if len(train_rows) < len(x_train):
        x_train, train_y = x_train[train_rows], train_y[train_rows]
    if len(test_rows) < len(x_test):
        x_test, test_y = x_test[test_rows], test_y[test_rows]
    few = per_class_sample(train_y, PROBE_PER_CLASS, seed)
    pca = pca_baseline(x_train, model.code_dim)
    features = {"codes": (_codes(model, x_train), _codes(model, x_test)),
                "PCA codes": (_codes(pca, x_train), _codes(pca, x_test)),
                "inputs": (x_train.numpy(), x_test.numpy())}
    return {
        "settings": PROBE_SETTINGS,
        "per_class": PROBE_PER_CLASS,
        "rows": {"per_class": int(len(few)), "all": int(len(train_y)), "test": int(len(test_y))},
        "features": {name: {"dims": int(train.shape[1]),
                            "per_class": probe_accuracy(train[few], train_y[few], test, test_y),
                            "all": probe_accuracy(train, train_y, test, test_y)}
                     for name, (train, test) in features.items()},
    }
