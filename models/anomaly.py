"""A version's anomaly score: one number per row, higher meaning more unusual than the training data.

Torch-free, like ``outputs.py``, which calls it for every engine. A version published with a reference set scores a
row by the mean Euclidean distance from its code to the codes of its ``k`` nearest reference rows, in a code space
standardized per dimension with the training codes' mean and standard deviation: distance-based outlier detection
(Ramaswamy, Rastogi & Shim 2000, the k-th-neighbour family) in the version's own code space. The reference set is a
seeded sample of the training rows' codes; a sample of a few thousand loses little (Sugiyama & Borgwardt, "Rapid
distance-based outlier detection via sampling", NeurIPS 2013), and its size sets the search's cost
(docs/benchmarks.md, "Anomaly scores: the neighbour search"). A version without one (published before reference sets,
or trained with ``anomaly.score = "error"``) scores a row by its reconstruction error.

The search is exact brute force in numpy (blocked ||a||^2 + ||b||^2 - 2ab, then argpartition), so every engine finds
the same neighbours; the k distances found are then computed again as plain differences, so that a row near a
reference row gets a small distance rather than the formula's rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Query rows per block of the search: a block's distances (BLOCK_ROWS x reference rows float32) stay in the caches'
# reach and bound the memory a big call takes.
BLOCK_ROWS = 512


@dataclass(frozen=True)
class Neighbors:
    """Fitted when a version is published: ``reference`` (m, code_dim) float32, the sampled training codes already
    standardized; ``mean`` and ``scale`` (code_dim,) float32, the training codes' mean and standard deviation (1 where
    a dimension does not vary); ``k`` the neighbours a score averages over (at most m)."""

    reference: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    k: int

    TENSORS = ("reference", "mean", "scale")  # stored in the weights file as anomaly.<name>

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
    def from_tensors(cls, tensors: dict[str, np.ndarray], k: int) -> Neighbors:
        reference, mean, scale = (np.ascontiguousarray(tensors[f"anomaly.{name}"], dtype=np.float32) for name in cls.TENSORS)
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
    the held-out rows' scores; ``neighbors`` the reference set, or None where the score is the reconstruction error."""

    quantiles: np.ndarray
    neighbors: Neighbors | None = None

    @property
    def needs_error(self) -> bool:
        """Whether scores are reconstruction errors (so a score needs the decoder)."""
        return self.neighbors is None

    def scores(self, codes: np.ndarray | None, errors: np.ndarray | None) -> np.ndarray:
        """Scores (n,) float32 from the rows' codes (n, code_dim) or, without a reference set, their errors (n,)."""
        if self.neighbors is None:
            return np.asarray(errors, dtype=np.float32)
        return self.neighbors.scores(codes)
