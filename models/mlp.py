"""Deep fully connected autoencoder (Hinton & Salakhutdinov, Science 2006: 784-1000-500-250-30)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import Size, Sizes

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,  # the paper's logistic units
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
Activation = Literal[tuple(ACTIVATIONS)]


@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    code_dim: Size = 30
    hidden: Sizes = (1000, 500, 250)
    activation: Activation = "gelu"
    # "sigmoid": reconstructions in [0, 1], trained with cross-entropy as in the paper;
    # "linear": unbounded reconstructions, trained with squared error.
    output: Literal["sigmoid", "linear"] = "sigmoid"


def layer_stack(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers through ``sizes`` with the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class MLPAutoencoder(Autoencoder):
    """Encoder input_dim -> hidden... -> code_dim (linear code layer); decoder mirrors it."""

    kind = "mlp"
    config_class = MLPConfig

    def __init__(self, config: MLPConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        input_dim = self.input_dim
        sizes = [input_dim, *config.hidden, config.code_dim]
        activation = ACTIVATIONS[config.activation]
        self.encoder = layer_stack(sizes, activation)
        self.decoder = layer_stack(sizes[::-1], activation)
        self.sigmoid_output = config.output == "sigmoid"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return torch.sigmoid(out) if self.sigmoid_output else out

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigmoid_output:
            logits = self.decoder(self.encoder(x))
            # Cross-entropy summed over pixels (Hinton & Salakhutdinov 2006), averaged over examples.
            return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
        return super().loss(x)
