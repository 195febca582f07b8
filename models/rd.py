"""A compression autoencoder: convolutions with GDN, quantized latents and a learned entropy model (kind "rd").

Ballé, Laparra & Simoncelli 2017, sized for small images: two stride-2 stages down to an (M, H/4, W/4) latent and
back. Training minimises rate + distortion_weight * distortion (the paper's lambda), with uniform noise standing in for rounding; at test time the
latents are rounded, and ``encode`` answers exactly the integers a compressed stream carries (so ``reconstruct`` shows
what ``decompress`` gives back). The lecture's remark that autoencoders do not compress "for free" is this module: the
code must be quantized, and its rate measured and traded against the distortion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import Positive, Size
from aeserve.models.conv import image_shape
from aeserve.models.entropy import GDN, RADIUS, FactorizedPrior, bits


@dataclass(frozen=True)
class RDConfig(ModelConfig):
    channels: Size = 64  # N: the transforms' width
    latent_channels: Size = 8  # M: the latent's channels; the code is (M, H/4, W/4), flattened
    # loss = bits per image + distortion_weight * 255^2 * squared error per image (Ballé et al.'s lambda)
    distortion_weight: Positive = 0.01
    # "channel": one learned density per latent channel, shared by its positions (Ballé et al.); "position": one per
    # latent value, for data whose images are aligned (centred objects, a fixed frame), where a background position's
    # values are far more predictable than the channel's as a whole. Either way the tables are fixed: no side information.
    prior: Literal["channel", "position"] = "channel"
    renamed_keys = {"lmbda": "distortion_weight"}  # versions published before the rename, and their configs, say lmbda
    # No code_dim: the code is the latent, latent_channels * (H/4) * (W/4) integers.


class RDAutoencoder(Autoencoder):
    kind = "rd"
    config_class = RDConfig

    def __init__(self, config: RDConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        self.image = image_shape(self.input_shape, 2)
        c, h, w = self.image
        n, m = config.channels, config.latent_channels
        self.latent = (m, h // 4, w // 4)
        self.analysis = nn.Sequential(
            nn.Conv2d(c, n, 5, stride=2, padding=2), GDN(n),
            nn.Conv2d(n, n, 5, stride=2, padding=2), GDN(n),
            nn.Conv2d(n, m, 3, padding=1),
        )
        self.synthesis = nn.Sequential(
            nn.Conv2d(m, n, 3, padding=1), GDN(n, inverse=True),
            nn.ConvTranspose2d(n, n, 5, stride=2, padding=2, output_padding=1), GDN(n, inverse=True),
            nn.ConvTranspose2d(n, c, 5, stride=2, padding=2, output_padding=1),
        )
        # The prior sees the latent as (densities, positions sharing one): (M, H/4, W/4), or each value its own.
        self.prior_shape = self.latent if config.prior == "channel" else (self.code_dim, 1, 1)
        self.prior = FactorizedPrior(self.prior_shape[0])

    @property
    def code_dim(self) -> int:
        m, h, w = self.latent
        return m * h * w

    def channel_of(self) -> torch.Tensor:
        """For each position of a flattened code, the density whose table codes it: its channel, or its own."""
        densities, h, w = self.prior_shape
        return torch.arange(densities).repeat_interleave(h * w)

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Latents (n, M, H, W) -> each value's probability mass under its density, shaped as the prior sees them."""
        return self.prior.likelihood(y.reshape(len(y), *self.prior_shape))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.analysis(x.reshape(-1, *self.image))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized latents, flattened: integers in [-RADIUS, RADIUS], as a stream carries them."""
        return torch.round(self.latents(x)).clamp(-RADIUS, RADIUS).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.synthesis(z.reshape(-1, *self.latent))).reshape(-1, self.input_dim)

    def rate_distortion(self, x: torch.Tensor, noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (bits, summed squared error in [0, 1] units), with noise (training) or rounding (evaluation)."""
        y = self.latents(x)
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noisy else torch.round(y).clamp(-RADIUS, RADIUS)
        x_hat = torch.sigmoid(self.synthesis(y_hat)).reshape(len(x), -1)
        return bits(self.likelihood(y_hat)), (x_hat - x.reshape(len(x), -1)).pow(2).sum(dim=1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        rate, distortion = self.rate_distortion(x, noisy=True)
        return (rate + self.config.distortion_weight * 255**2 * distortion).mean()

    def coding_tables(self) -> tuple[np.ndarray, np.ndarray]:
        return self.prior.pmf.detach().cpu().numpy(), self.channel_of().numpy()

    def finish(self) -> dict[str, float]:
        self.prior.make_tables()
        return {}

    @torch.no_grad()
    def extra_metrics(self, x: torch.Tensor) -> dict[str, float]:
        rate, distortion = self.rate_distortion(x, noisy=False)
        mse = distortion / self.input_dim
        return {"rate_bits": float(rate.mean()), "rate_bytes": float(rate.mean() / 8),
                "psnr": float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())}
