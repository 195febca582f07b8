"""Variational autoencoder (Kingma & Welling, 2014): a Gaussian posterior per input, a Bernoulli decoder.

``encode`` answers the posterior mean and ``forward`` decodes it, so the
service treats a VAE like any other autoencoder; training maximises the ELBO.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import NonNegative, Size, Sizes
from aeserve.models.mlp import ACTIVATIONS, Activation, layer_stack


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    code_dim: Size = 16
    hidden: Sizes = (512, 256)
    activation: Activation = "gelu"
    beta: NonNegative = 1.0  # weight of the KL term (1: the true ELBO)


class VAE(Autoencoder):
    kind = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        act = ACTIVATIONS[config.activation]
        # The encoder's last layer answers posterior mean and log-variance side by side: (n, 2 * code_dim).
        self.encoder = layer_stack([self.input_dim, *config.hidden, 2 * config.code_dim], act)
        self.decoder = layer_stack([config.code_dim, *config.hidden[::-1], self.input_dim], act)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30, 20)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def elbo_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (reconstruction cross-entropy, KL to the unit Gaussian prior), both (n,), one posterior sample."""
        mean, log_var = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + (0.5 * log_var).exp() * noise  # reparameterisation trick
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(dim=1)
        # KL(N(mean, var) || N(0, I)) in closed form: Kingma & Welling 2014, appendix B.
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1)
        return reconstruction, kl

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        reconstruction, kl = self.elbo_terms(x)
        return (reconstruction + self.config.beta * kl).mean()

    @torch.no_grad()
    def extra_metrics(self, x: torch.Tensor) -> dict[str, float]:
        reconstruction, kl = self.elbo_terms(x, torch.Generator(device=x.device).manual_seed(0))
        return {"elbo": float(-(reconstruction + kl).mean()), "elbo_reconstruction": float(reconstruction.mean()), "elbo_kl": float(kl.mean())}
