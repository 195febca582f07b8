"""The interface every autoencoder answers."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from aeserve.models.config import Config


class ModelConfig(Config):
    """Base of each kind's config dataclass: its keys are the [model] table's."""

    section = "model"


class Autoencoder(nn.Module):
    """Base class: ``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) = decode(encode(x))``.

    All tensors are float32; ``x`` and ``x_hat`` are (n, input_dim) in model
    space (see :class:`Preprocessing`), ``z`` is (n, code_dim).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]

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

    def finish(self) -> dict[str, Any]:
        """After gradient training, before publishing: derive what the trained weights determine (an entropy
        model's coding tables, say). Returns facts for the manifest (may be empty). Default: nothing."""
        return {}

    def coding_tables(self) -> tuple[Any, Any] | None:
        """For a model with an entropy model: (probability tables (channels, symbols), the channel of each code
        position), as numpy arrays, for coding its codes into streams; None for the others."""
        return None

    def extra_metrics(self, x: torch.Tensor) -> dict[str, float]:
        """Kind-specific held-out metrics on x (n, input_dim), merged into the manifest's metrics."""
        return {}

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar training loss for a batch: summed squared error per example, averaged."""
        return (self(x) - x).pow(2).sum(dim=1).mean()

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
