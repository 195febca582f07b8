"""Linear autoencoder x_hat = U V (x - mean) + mean, trained by gradient descent.

The lecture's claim: at the optimum of squared error, the column space of U is
the top-K principal subspace. tests/models/test_linear.py checks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import Size


@dataclass(frozen=True)
class LinearConfig(ModelConfig):
    code_dim: Size = 30


class LinearAutoencoder(Autoencoder):
    kind = "linear"
    config_class = LinearConfig

    def __init__(self, config: LinearConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        input_dim = self.input_dim
        self.encoder = nn.Linear(input_dim, config.code_dim, bias=False)  # V: (code_dim, input_dim)
        self.decoder = nn.Linear(config.code_dim, input_dim, bias=False)  # U: (input_dim, code_dim)
        # Fitted state: the data mean, so that U V acts on centred data as in PCA.
        self.register_buffer("mean", torch.zeros(input_dim))

    def prepare(self, x_train: torch.Tensor) -> dict:
        self.mean.copy_(x_train.mean(dim=0))
        return {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x - self.mean)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) + self.mean
