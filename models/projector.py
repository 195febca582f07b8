"""2-D projector for the map: fitted on training codes at training time, applied to new codes."""
from __future__ import annotations

import torch
from torch import nn

from models.pca import principal_components


class Projector(nn.Module):
    """Affine map from codes (n, code_dim) to map coordinates (n, 2), float32.

    For a 2-D code it is the identity; otherwise the top two principal
    directions of the training codes.
    """

    kind = "pca"

    def __init__(self, code_dim: int) -> None:
        super().__init__()
        self.code_dim = int(code_dim)
        # Fitted state, set by fit().
        self.register_buffer("mean", torch.zeros(code_dim))
        self.register_buffer("components", torch.eye(2, code_dim) if code_dim >= 2 else torch.zeros(2, code_dim))

    def fit(self, codes: torch.Tensor) -> Projector:
        if self.code_dim == 2:
            return self
        if self.code_dim == 1:
            self.components.zero_()
            self.components[0, 0] = 1.0
            return self
        mean, components = principal_components(codes, 2)
        self.mean.copy_(mean)
        self.components.copy_(components)
        return self

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) @ self.components.T
