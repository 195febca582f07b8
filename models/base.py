"""The interface every autoencoder answers, and the preprocessing that travels with it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


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


def config_from_dict(config_class: type, values: dict[str, Any]):
    """Build a config dataclass, naming unknown keys and the keys that are allowed."""
    allowed = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} key(s) {unknown}; allowed: {sorted(allowed)}")
    return config_class(**values)


class Autoencoder(nn.Module):
    """Base class: ``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) = decode(encode(x))``.

    All tensors are float32; ``x`` and ``x_hat`` are (n, input_dim) in model
    space (see :class:`Preprocessing`), ``z`` is (n, code_dim).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if not input_shape or any(int(s) <= 0 for s in input_shape):
            raise ValueError(f"input_shape must be positive sizes, got {input_shape}")
        self.config = config
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_dim = math.prod(self.input_shape)

    @property
    def code_dim(self) -> int:
        return int(self.config.code_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def prepare(self, x_train: torch.Tensor) -> dict[str, Any]:
        """Fit whatever has a closed form or a pre-training stage, before gradient training.

        x_train: (n, input_dim) float32 in model space. Returns facts worth recording
        in the manifest (may be empty). Default: nothing to do.
        """
        return {}

    def extra_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """Kind-specific held-out metrics on x (n, input_dim), merged into the manifest's metrics."""
        return {}

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar training loss for a batch: summed squared error per example, averaged."""
        return (self(x) - x).pow(2).sum(dim=1).mean()

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
