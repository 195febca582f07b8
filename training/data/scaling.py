"""Fitting ``data.scaling`` on the training rows: the offset and scale that map raw values to the model's space."""
from __future__ import annotations

import numpy as np

from aeserve.models.preprocessing import Preprocessing
from aeserve.training.data.dataset import CHUNK_ROWS, DataError, RowsOnDemand, chunks


def _global(name: str, x: np.ndarray, low: float, high: float) -> Preprocessing:
    """One offset and scale for every value of x (n, ...): the data's range [low, high] maps to [0, 1]."""
    if not high > low:
        raise DataError(f"{name}: all values equal {low}; nothing to learn")
    return Preprocessing(input_shape=x.shape[1:], offset=low, scale=1.0 / (high - low), scaling="global")


def _per_feature(x: np.ndarray, offset: np.ndarray, spread: np.ndarray, scaling: str) -> Preprocessing:
    """An offset and scale per feature (input_dim,); a feature that never varies (spread 0) gets a scale of 1."""
    scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 1.0)
    return Preprocessing(input_shape=x.shape[1:], offset=offset, scale=scale, scaling=scaling)


def _fit_in_chunks(name: str, x: np.ndarray, scaling: str) -> Preprocessing:
    def rows(chunk: np.ndarray) -> np.ndarray:
        chunk = chunk.reshape(len(chunk), -1)
        return chunk.astype(np.float32) if chunk.dtype.kind == "f" else chunk

    low = high = None
    total = None
    for chunk in chunks(x):
        flat = rows(chunk)
        if scaling == "standard":
            part = flat.astype(np.float64).sum(axis=0)
            total = part if total is None else total + part
            continue
        axis = None if scaling == "global" else 0
        chunk_low, chunk_high = flat.min(axis=axis), flat.max(axis=axis)
        low = chunk_low if low is None else np.minimum(low, chunk_low)
        high = chunk_high if high is None else np.maximum(high, chunk_high)
    if scaling == "global":
        return _global(name, x, float(low), float(high))
    if scaling == "minmax":
        offset, spread = low.astype(np.float64), high.astype(np.float64) - low.astype(np.float64)
    else:
        offset = total / len(x)
        squares = sum(np.square(rows(chunk).astype(np.float64) - offset).sum(axis=0) for chunk in chunks(x))
        spread = np.sqrt(squares / len(x))
    return _per_feature(x, offset, spread, scaling)


def fit_scaling(name: str, x: np.ndarray, scaling: str) -> Preprocessing:
    """The preprocessing of ``scaling`` fitted on the training rows ``x`` (n, ...).

    A feature that never varies gets a scale of 1 (it maps to 0); global scaling of data that never varies is an error.
    More than CHUNK_ROWS rows are read in chunks (float32 rows, float64 sums), so a memory-mapped array is never
    copied whole; the standard deviation then comes from a second pass over the rows, around the mean of the first.
    """
    if len(x) > CHUNK_ROWS or isinstance(x, RowsOnDemand):
        return _fit_in_chunks(name, x, scaling)
    flat = x.reshape(len(x), -1)
    if scaling == "global":
        return _global(name, x, float(np.min(flat)), float(np.max(flat)))
    flat = flat.astype(np.float64)
    if scaling == "minmax":
        offset, spread = flat.min(axis=0), flat.max(axis=0) - flat.min(axis=0)
    else:
        offset, spread = flat.mean(axis=0), flat.std(axis=0)
    return _per_feature(x, offset, spread, scaling)
