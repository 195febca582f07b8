"""A version's anomaly score: one number per row, higher meaning more unusual than the training data.

Torch-free, like ``outputs.py``, which calls it for every engine, so that every engine scores rows the same way. The
manifest's ``anomaly.score`` names one of three:

- ``"combined"`` (``Combined``, the default): how unusual the row's code is among the training codes, and how unusual
  its reconstruction's residual is, each relative to the training rows. With z the code (code_dim,) and r = x - x_hat
  the residual in model space (input_dim,)::

      score = (T2(z) / code_dim + sum_j r_j^2 / v_j / input_dim) / 2

  T2 is Hotelling's: the squared Mahalanobis distance of z from the training codes' mean under their covariance; v_j
  is the training rows' mean squared residual in feature j. Each term averages about 1 over the training rows, so a
  typical row scores about 1. These are the two statistics that monitor a PCA model (Hotelling's T2 in the subspace,
  the residual's Q off it; Jackson & Mudholkar 1979), each divided by its expectation and added, as in the combined
  index of Yue & Qin (2001), with the residual weighted per feature as factor analysis weighs its noise: a Gaussian
  negative log-likelihood over the code and the residual, the two parts given equal weight. It needs no reference set
  and costs O(code_dim^2 + input_dim) per row, less than the model call. Chosen over neighbour distances and the
  error alone on the measurements in docs/benchmarks.md, "Anomaly scores".
- ``"neighbors"`` (``Neighbors``): the mean distance from the code to its k nearest codes in a reference set of
  training codes. The default before ``combined``; versions published with it still serve.
- ``"error"`` (no fitted state): the reconstruction error. Versions published before anomaly scores (no ``anomaly``
  section) score so too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

SCORES = ("combined", "neighbors", "error")
# What a score is computed from: the row's reconstruction error (n,), its code (n, code_dim), or its code and its
# squared error per feature (n, input_dim).
Needs = Literal["error", "code", "feature_error"]

# Query rows per block of the neighbour search: a block's distances (BLOCK_ROWS x reference rows float32) stay in the
# caches' reach and bound the memory a big call takes.
BLOCK_ROWS = 512
# Floors of the combined score's variances, so that directions the training rows do not vary in cannot blow a score
# up from rounding: a code direction's variance at least EIGEN_FLOOR of the mean; a feature's residual variance at
# least RESIDUAL_FLOOR of the mean (pixels that are always blank and always reconstructed), and at least EXACT of the
# inputs' variance (a reconstruction exact up to rounding, PCA with as many components as the data's rank: its term
# then stays near 0). Scores hardly move with them: docs/benchmarks.md, "Anomaly scores".
EIGEN_FLOOR = 1e-6
RESIDUAL_FLOOR = 0.1
EXACT = 1e-6


@dataclass(frozen=True)
class Combined:
    """Fitted when a version is published, on its training rows: ``code_mean`` (code_dim,) float32, the codes' mean;
    ``code_whiten`` (code_dim, code_dim) float32, W with ||(z - code_mean) W||^2 = T2 (the codes' inverse covariance
    square root, its eigenvalues floored); ``residual_weight`` (input_dim,) float32, 1 / v_j (floored)."""

    code_mean: np.ndarray
    code_whiten: np.ndarray
    residual_weight: np.ndarray

    TENSORS = ("code_mean", "code_whiten", "residual_weight")  # stored in the weights file as anomaly.<name>
    needs: ClassVar[Needs] = "feature_error"

    def __post_init__(self) -> None:
        # The constants folded in once, so that a score is two products: ||(z - mean) W'||^2 + e @ w'.
        code_dim, input_dim = len(self.code_mean), len(self.residual_weight)
        object.__setattr__(self, "_code_whiten", (self.code_whiten * np.sqrt(0.5 / code_dim)).astype(np.float32))
        object.__setattr__(self, "_residual_weight", (self.residual_weight * (0.5 / input_dim)).astype(np.float32))

    @classmethod
    def fit(cls, codes: np.ndarray, residual_mean_square: np.ndarray, input_variance: float) -> Combined:
        """From training codes (n, code_dim), the training rows' mean squared residual per feature (input_dim,) and
        the mean variance of their inputs' features (a number, in model space)."""
        codes = np.asarray(codes, dtype=np.float64)
        mean = codes.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(np.atleast_2d(np.cov(codes, rowvar=False, bias=True)))
        eigenvalues = np.maximum(eigenvalues, EIGEN_FLOOR * eigenvalues.mean() if eigenvalues.mean() > 0 else 1.0)
        variance = np.asarray(residual_mean_square, dtype=np.float64)
        floor = max(RESIDUAL_FLOOR * variance.mean(), EXACT * input_variance)
        variance = np.maximum(variance, floor if floor > 0 else 1.0)
        return cls(mean.astype(np.float32), (eigenvectors / np.sqrt(eigenvalues)).astype(np.float32), (1.0 / variance).astype(np.float32))

    def tensors(self) -> dict[str, np.ndarray]:
        """The fitted arrays as the weights file holds them: anomaly.<name> -> float32."""
        return {f"anomaly.{name}": getattr(self, name) for name in self.TENSORS}

    @classmethod
    def shapes(cls, code_dim: int, input_dim: int) -> dict[str, tuple[int, ...]]:
        return {"anomaly.code_mean": (code_dim,), "anomaly.code_whiten": (code_dim, code_dim), "anomaly.residual_weight": (input_dim,)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> Combined:
        fitted = cls(*(np.ascontiguousarray(tensors[f"anomaly.{name}"], dtype=np.float32) for name in cls.TENSORS))
        if not all(np.isfinite(a).all() for a in (fitted.code_mean, fitted.code_whiten, fitted.residual_weight)) \
                or not (fitted.residual_weight > 0).all():
            raise ValueError("anomaly.code_mean and anomaly.code_whiten must be finite, anomaly.residual_weight finite and positive")
        return fitted

    def terms(self, codes: np.ndarray, feature_errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T2 / code_dim, weighted residual / input_dim), each (n,) float32, of codes (n, code_dim) and squared
        errors per feature (n, input_dim)."""
        centred = np.asarray(codes, dtype=np.float32) - self.code_mean
        t2 = np.square(np.einsum("ij,jk->ik", centred, self.code_whiten)).sum(axis=1) / np.float32(len(self.code_mean))
        residual = np.einsum("ij,j->i", np.asarray(feature_errors, dtype=np.float32), self.residual_weight) / np.float32(len(self.residual_weight))
        return t2, residual

    def scores(self, codes: np.ndarray, feature_errors: np.ndarray) -> np.ndarray:
        """Codes (n, code_dim) and squared errors per feature (n, input_dim) -> (n,) float32."""
        # einsum rather than @: a product as big as a large call's would start numpy's BLAS threads, which then spin
        # against torch's threads on the next block of the call and slowed it several-fold (docs/benchmarks.md,
        # "Anomaly scores: what scoring costs"); einsum's own loop runs on the calling thread.
        whitened = np.einsum("ij,jk->ik", np.asarray(codes, dtype=np.float32) - self.code_mean, self._code_whiten)
        residual = np.einsum("ij,j->i", np.asarray(feature_errors, dtype=np.float32), self._residual_weight)
        return np.einsum("ij,ij->i", whitened, whitened) + residual


@dataclass(frozen=True)
class Neighbors:
    """The neighbour score, fitted when a version is published: ``reference`` (m, code_dim) float32, a seeded sample
    of the training codes, standardized; ``mean`` and ``scale`` (code_dim,) float32, the training codes' mean and
    standard deviation (1 where a dimension does not vary); ``k`` the neighbours a score averages over (at most m).

    Distance-based outlier detection (Ramaswamy, Rastogi & Shim 2000) in the version's code space. The search is exact
    brute force in numpy (blocked ||a||^2 + ||b||^2 - 2ab, then argpartition), so every engine finds the same
    neighbours; the k distances found are then computed again as plain differences, so that a row near a reference row
    gets a small distance rather than the formula's rounding.
    """

    reference: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    k: int

    TENSORS = ("reference", "mean", "scale")  # stored in the weights file as anomaly.<name>
    needs: ClassVar[Needs] = "code"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_reference_sq", np.square(self.reference, dtype=np.float32).sum(axis=1))

    @classmethod
    def fit(cls, codes: np.ndarray, k: int, reference_rows: int, seed: int) -> Neighbors:
        """From training codes (n, code_dim): standardized with their mean and deviation, a seeded sample of
        ``reference_rows`` of them (all when there are fewer) in their order as the reference."""
        codes = np.asarray(codes, dtype=np.float64)
        mean, deviation = codes.mean(axis=0), codes.std(axis=0)
        scale = np.where(deviation > 0, deviation, 1.0)
        rows = np.arange(len(codes)) if len(codes) <= reference_rows else \
            np.sort(np.random.default_rng(seed).choice(len(codes), size=reference_rows, replace=False))
        reference = ((codes[rows] - mean) / scale).astype(np.float32)
        return cls(reference, mean.astype(np.float32), scale.astype(np.float32), min(k, len(reference)))

    def tensors(self) -> dict[str, np.ndarray]:
        """The fitted arrays as the weights file holds them: anomaly.<name> -> float32."""
        return {f"anomaly.{name}": getattr(self, name) for name in self.TENSORS}

    @classmethod
    def shapes(cls, reference_rows: int, code_dim: int) -> dict[str, tuple[int, ...]]:
        return {"anomaly.reference": (reference_rows, code_dim), "anomaly.mean": (code_dim,), "anomaly.scale": (code_dim,)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], k: int) -> Neighbors:
        reference, mean, scale = (np.ascontiguousarray(tensors[f"anomaly.{name}"], dtype=np.float32) for name in cls.TENSORS)
        if not (np.isfinite(reference).all() and np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("anomaly.reference and anomaly.mean must be finite, anomaly.scale finite and positive")
        return cls(reference, mean, scale, min(k, len(reference)))

    def standardize(self, codes: np.ndarray) -> np.ndarray:
        """Codes (n, code_dim) -> (n, code_dim) float32 in the reference's standardized space."""
        return ((np.asarray(codes, dtype=np.float32) - self.mean) / self.scale).astype(np.float32, copy=False)

    def scores(self, codes: np.ndarray) -> np.ndarray:
        """Codes (n, code_dim) -> (n,) float32: the mean distance to the k nearest reference rows."""
        queries = self.standardize(codes)
        scores = np.empty(len(queries), np.float32)
        k = self.k
        for start in range(0, len(queries), BLOCK_ROWS):
            block = queries[start:start + BLOCK_ROWS]
            # ||a - b||^2 without the row's own ||a||^2, which does not change which reference rows are nearest.
            partial = self._reference_sq - 2.0 * (block @ self.reference.T)
            nearest = np.argpartition(partial, k - 1, axis=1)[:, :k] if k < partial.shape[1] else \
                np.broadcast_to(np.arange(k), partial.shape)
            differences = self.reference[nearest] - block[:, None, :]  # (rows, k, code_dim)
            scores[start:start + len(block)] = np.sqrt(np.square(differences).sum(axis=2)).mean(axis=1)
        return scores


@dataclass(frozen=True)
class AnomalyScore:
    """What a version scores rows by, and where a score falls: ``quantiles`` (N,) float64, evenly spaced quantiles of
    the held-out rows' scores; ``method`` the fitted score, or None where the score is the reconstruction error."""

    quantiles: np.ndarray
    method: Combined | Neighbors | None = None

    @property
    def needs(self) -> Needs:
        """What a score is computed from (so which graphs a call that asks for scores must run)."""
        return "error" if self.method is None else self.method.needs

    def scores(self, codes: np.ndarray | None, errors: np.ndarray | None, feature_errors: np.ndarray | None = None) -> np.ndarray:
        """Scores (n,) float32 from what ``needs`` names: the rows' errors (n,), codes (n, code_dim) or codes and
        squared errors per feature (n, input_dim)."""
        if self.method is None:
            return np.asarray(errors, dtype=np.float32)
        if isinstance(self.method, Neighbors):
            return self.method.scores(codes)
        return self.method.scores(codes, feature_errors)

    def section(self) -> dict[str, Any]:
        """The manifest's ``anomaly`` keys that rebuild it with ``from_manifest`` (with ``tensors``)."""
        if self.method is None:
            return {"score": "error"}
        if isinstance(self.method, Neighbors):
            return {"score": "neighbors", "k": self.method.k, "reference_rows": len(self.method.reference)}
        return {"score": "combined"}

    def tensors(self) -> dict[str, np.ndarray]:
        """The fitted arrays as the weights file holds them: anomaly.<name> -> float32 (none for the error)."""
        return {} if self.method is None else self.method.tensors()


def _score_of(section: dict[str, Any] | None) -> str:
    score = "error" if section is None else section["score"]
    if score not in SCORES:
        raise ValueError(f"anomaly.score {score!r} is not one of {list(SCORES)}")
    return score


def tensor_shapes(section: dict[str, Any] | None, code_dim: int, input_dim: int) -> dict[str, tuple[int, ...]]:
    """The weights file's anomaly.* tensors that the manifest's ``anomaly`` section (None: published before anomaly
    scores) calls for: name -> shape. Raises KeyError, TypeError or ValueError for a section that is not valid."""
    score = _score_of(section)
    if score == "neighbors":
        k, reference_rows = int(section["k"]), int(section["reference_rows"])
        if k < 1 or reference_rows < 1:
            raise ValueError("anomaly.k and anomaly.reference_rows must be at least 1")
        return Neighbors.shapes(reference_rows, code_dim)
    return Combined.shapes(code_dim, input_dim) if score == "combined" else {}


def from_manifest(section: dict[str, Any] | None, quantiles: np.ndarray, tensors: dict[str, np.ndarray]) -> AnomalyScore:
    """The version's score from its manifest's ``anomaly`` section (None: published before anomaly scores, which
    score by the error), its held-out quantiles and its weights' tensors (numpy, of the shapes ``tensor_shapes``
    gives). Raises ValueError naming a value that is not valid."""
    score = _score_of(section)
    quantiles = np.asarray(quantiles, dtype=np.float64)
    if score == "neighbors":
        return AnomalyScore(quantiles, Neighbors.from_tensors(tensors, int(section["k"])))
    return AnomalyScore(quantiles, Combined.from_tensors(tensors) if score == "combined" else None)
