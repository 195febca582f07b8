"""The preprocessing that travels with every version: raw inputs to the model's space and back.

Torch-free (the tensor maps only call tensor methods), so the engine process can use it without importing torch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Scaling = Literal["global", "minmax", "standard"]
SCALINGS = ("global", "minmax", "standard")
TENSORS = ("offset", "scale")  # stored as preprocessing.offset / preprocessing.scale in the weights file when per feature


@dataclass(frozen=True)
class Preprocessing:
    """Maps raw inputs to the model's space: ``x_model = (x_raw - offset) * scale``, flattened.

    ``offset`` and ``scale`` are one number each (``global``: one offset and scale for every value, fitted so the
    training data lies in [0, 1]) or one per feature, float32 (input_dim,): ``minmax`` puts each feature's training
    range at [0, 1], ``standard`` gives each a mean of 0 and a standard deviation of 1. They are fitted on the training
    data and applied again when serving, so they live only here.
    """

    input_shape: tuple[int, ...]
    offset: float | np.ndarray = 0.0
    scale: float | np.ndarray = 1.0
    scaling: Scaling = "global"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling {self.scaling!r} is not one of {list(SCALINGS)}")
        for name in TENSORS:
            value = getattr(self, name)
            if np.ndim(value) == 0:
                object.__setattr__(self, name, float(value))
                continue
            vector = np.asarray(value, dtype=np.float32)
            if vector.shape != (self.input_dim,):
                raise ValueError(f"{name} must be one number or {self.input_dim} (one per feature), got shape {list(vector.shape)}")
            object.__setattr__(self, name, vector)
        offset, scale = np.asarray(self.offset), np.asarray(self.scale)
        if not (np.isfinite(scale).all() and (scale > 0).all()) or not np.isfinite(offset).all():
            raise ValueError("scale must be finite and > 0 and offset finite, for every feature")

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def per_feature(self) -> bool:
        return isinstance(self.scale, np.ndarray)

    @functools.cached_property
    def _bounds(self) -> dict[float, float]:
        return {}

    def magnitude_bound(self, reach: float) -> float:
        """The largest raw magnitude within ``reach`` scaled units of zero for every value: max(|offset| + reach / scale),
        as float32. Worked out once per reach: servers ask it on every request."""
        bounds = self._bounds
        if reach not in bounds:
            bounds[reach] = float(np.float32(np.max(np.abs(np.asarray(self.offset, np.float64)) + reach / np.asarray(self.scale, np.float64))))
        return bounds[reach]

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) or (n, input_dim) raw values -> (n, input_dim) float32 in model space."""
        x = np.asarray(x).reshape(len(x), self.input_dim)
        if not self.per_feature and self.offset == 0:  # one pass over what may be a large batch, made float32 in it
            return np.multiply(x, np.float32(self.scale), dtype=np.float32)
        x = np.asarray(x, dtype=np.float32)
        return (x - self._f32(self.offset)) * self._f32(self.scale)

    def from_model(self, x: np.ndarray) -> np.ndarray:
        """(n, input_dim) model-space values -> (n, *input_shape) float32 raw values."""
        x = np.asarray(x, dtype=np.float32) / self._f32(self.scale) + self._f32(self.offset)
        return x.reshape(len(x), *self.input_shape)

    @staticmethod
    def _f32(value: float | np.ndarray) -> np.float32 | np.ndarray:
        return value if isinstance(value, np.ndarray) else np.float32(value)

    # The same maps on tensors, for a version on a GPU: raw rows cross to the device as they came and are scaled there.
    def to_model_tensor(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.input_dim)
        if not self.per_feature and self.offset == 0:
            return x * self.scale
        return (x - self._tensor(self.offset, x)) * self._tensor(self.scale, x)

    def from_model_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self._tensor(self.scale, x) + self._tensor(self.offset, x)).reshape(len(x), *self.input_shape)

    @staticmethod
    def _tensor(value: float | np.ndarray, like: torch.Tensor) -> float | torch.Tensor:
        if not isinstance(value, np.ndarray):
            return value
        return like.new_tensor(value)

    def to_dict(self) -> dict[str, Any]:
        """For the manifest: numbers as they are; per-feature vectors go to the weights file (``tensors``)."""
        if self.per_feature:
            return {"input_shape": list(self.input_shape), "scaling": self.scaling, "per_feature": True}
        return {"input_shape": list(self.input_shape), "offset": self.offset, "scale": self.scale, "scaling": self.scaling}

    def tensors(self) -> dict[str, np.ndarray]:
        """The per-feature vectors under their names in the weights file (empty for one offset and scale)."""
        return {f"preprocessing.{name}": getattr(self, name) for name in TENSORS} if self.per_feature else {}

    def to_wire(self) -> dict[str, Any]:
        """Everything as JSON (for the engine process), vectors as lists."""
        return {"input_shape": list(self.input_shape), "scaling": self.scaling,
                **{name: np.asarray(getattr(self, name)).tolist() for name in TENSORS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, Any] | None = None) -> Preprocessing:
        """From ``to_dict`` (with the weights file's ``tensors`` when per feature) or ``to_wire``."""
        values = {}
        for name in TENSORS:
            if d.get("per_feature"):
                key = f"preprocessing.{name}"
                if not tensors or key not in tensors:
                    raise ValueError(f"the manifest's preprocessing is per feature but the weights file has no {key}")
                values[name] = np.asarray(tensors[key], dtype=np.float32)
            else:
                value = d[name]
                values[name] = np.asarray(value, dtype=np.float32) if isinstance(value, list) else float(value)
        return cls(input_shape=tuple(d["input_shape"]), scaling=d.get("scaling", "global"), **values)
