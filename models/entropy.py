"""Learned compression's parts: GDN, the factorized entropy prior, and the entropy coder over it.

GDN (generalized divisive normalization) and the factorized prior follow Ballé, Laparra & Simoncelli, "End-to-end
optimized image compression" (ICLR 2017) and the non-parametric density of Ballé et al. 2018 (appendix 6.1): one
learned cumulative distribution per latent channel, made monotone by softplus weights. In training the latents get
uniform noise as the stand-in for rounding; the rate is ``-log2`` of the probability mass the density gives each
latent's unit interval.

The coder (models/streams.py, torch-free) is constriction's range coder (``constriction.stream.queue``): exact, fast, and it needs only numpy. The
probability tables it codes with are computed from the trained density once, at publishing, and stored with the
version, so a stream decodes with exactly the tables it was encoded with, whatever engine runs the networks.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from aeserve.models.streams import RADIUS, RangeCoder

__all__ = ["GDN", "FactorizedPrior", "bits", "RADIUS", "RangeCoder", "PMF_FLOOR"]

# The smallest probability a table entry gets before the coder's own floor: keeps every symbol codable.
PMF_FLOOR = 1e-9


class GDN(nn.Module):
    """y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2), per pixel; ``inverse`` multiplies instead (IGDN)."""

    def __init__(self, channels: int, inverse: bool = False) -> None:
        super().__init__()
        self.inverse = inverse
        # Non-negative through squaring; initialised as in the paper: beta 1, gamma 0.1 on the diagonal.
        self.beta_root = nn.Parameter(torch.ones(channels))
        self.gamma_root = nn.Parameter(math.sqrt(0.1) * torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta_root.pow(2) + 1e-6
        gamma = self.gamma_root.pow(2)
        norm = torch.sqrt(F.conv2d(x * x, gamma[:, :, None, None], beta))
        return x * norm if self.inverse else x / norm


class FactorizedPrior(nn.Module):
    """A learned density per channel; ``likelihood(y)`` is the mass of [y - 1/2, y + 1/2] under it."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(dims) - 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        # Probability tables for coding, (channels, 2 * RADIUS + 1), filled by ``make_tables`` after training.
        self.register_buffer("pmf", torch.zeros(channels, 2 * RADIUS + 1))

    def cdf_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(C, 1, N) values -> (C, 1, N) logits of the cumulative distribution, monotone in each value."""
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
            x = torch.matmul(F.softplus(matrix), x) + bias
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Latents (n, C, H, W) -> the probability mass of each one's unit interval, same shape."""
        n, c, h, w = y.shape
        values = y.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower, upper = self.cdf_logits(values - 0.5), self.cdf_logits(values + 0.5)
        # Subtract in the tail where the sigmoids are least rounded (as in the reference implementation).
        sign = -torch.sign(lower + upper).detach()
        mass = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return mass.clamp_min(PMF_FLOOR).reshape(c, n, h, w).permute(1, 0, 2, 3)

    @torch.no_grad()
    def make_tables(self) -> None:
        """Fill ``pmf`` with each channel's mass on the integers -RADIUS..RADIUS (normalised)."""
        channels = self.pmf.shape[0]
        symbols = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float32, device=self.pmf.device)
        values = symbols.expand(channels, 1, -1)
        lower, upper = self.cdf_logits(values - 0.5), self.cdf_logits(values + 0.5)
        sign = -torch.sign(lower + upper)
        mass = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).reshape(channels, -1).clamp_min(PMF_FLOOR)
        self.pmf.copy_(mass / mass.sum(dim=1, keepdim=True))


def bits(likelihood: torch.Tensor) -> torch.Tensor:
    """Per-example information content in bits: (n, ...) likelihoods -> (n,)."""
    return -torch.log2(likelihood).flatten(1).sum(dim=1)
