"""The preprocessing that travels with every version: raw inputs to the model's space and back.

Torch-free (the tensor maps only call tensor methods), so the engine process can use it without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """Maps raw inputs to the model's space: ``x_model = (x_raw - offset) * scale``, flattened.

    The constants are fitted on the training data so that it lies in [0, 1];
    the same constants are applied when serving, so they live only here.
    """

    input_shape: tuple[int, ...]
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {self.input_shape!r}")
        if not (math.isfinite(self.scale) and self.scale > 0) or not math.isfinite(self.offset):
            raise ValueError(f"scale must be finite and > 0 and offset finite, got scale={self.scale}, offset={self.offset}")
        object.__setattr__(self, "input_shape", shape)

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """(n, *input_shape) or (n, input_dim) raw values -> (n, input_dim) float32 in model space."""
        x = np.asarray(x, dtype=np.float32).reshape(len(x), self.input_dim)
        if self.offset == 0:
            return x * np.float32(self.scale)  # one pass instead of two over what may be a large batch
        return (x - np.float32(self.offset)) * np.float32(self.scale)

    def from_model(self, x: np.ndarray) -> np.ndarray:
        """(n, input_dim) model-space values -> (n, *input_shape) float32 raw values."""
        x = np.asarray(x, dtype=np.float32) / np.float32(self.scale) + np.float32(self.offset)
        return x.reshape(len(x), *self.input_shape)

    # The same maps on tensors, for a version on a GPU: raw rows cross to the device as they came and are scaled there.
    def to_model_tensor(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.input_dim)
        return x * self.scale if self.offset == 0 else (x - self.offset) * self.scale

    def from_model_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale + self.offset).reshape(len(x), *self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(input_shape=tuple(d["input_shape"]), offset=float(d["offset"]), scale=float(d["scale"]))
