"""PCA: the optimal linear autoencoder, fitted in closed form."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import Size


@dataclass(frozen=True)
class PCAConfig(ModelConfig):
    code_dim: Size = 30


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of x: (n, d) float -> (mean (d,), components (k, d)), float32.

    Computed from the d x d scatter matrix in float64 (exact for d << n and
    deterministic). Signs follow scikit-learn's svd_flip: the entry of largest
    magnitude in each component is positive, so refitting gives the same codes.
    """
    n, d = x.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"code_dim must be between 1 and min(n_examples, input_dim) = {min(n, d)}, got {k}")
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    centred = x64 - mean
    return mean.float(), top_components(centred.T @ centred, k).float()


def top_components(scatter: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors of a scatter matrix (d, d) float64, as rows (k, d), largest eigenvalue first.

    Signs follow scikit-learn's svd_flip: the entry of largest magnitude in each component is positive.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter)
    components = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[:k]].T
    pivot = components.abs().argmax(dim=1)
    return components * torch.sign(components[torch.arange(k), pivot])[:, None]


class PCA(Autoencoder):
    """z = C (x - mean), x_hat = C^T z + mean, with C the top principal directions (code_dim, input_dim)."""

    kind = "pca"
    config_class = PCAConfig

    def __init__(self, config: PCAConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        input_dim = self.input_dim
        # Fitted state, set by prepare().
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("components", torch.zeros(config.code_dim, input_dim))

    def prepare(self, x_train: torch.Tensor) -> dict:
        mean, components = principal_components(x_train, self.code_dim)
        self.mean.copy_(mean)
        self.components.copy_(components)
        return {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.components + self.mean
