"""Deep autoencoder with layer-wise RBM pre-training (Hinton & Salakhutdinov, Science 2006).

A stack of RBMs is trained greedily with contrastive divergence (CD-1), each on
the hidden probabilities of the one below; the top RBM has linear (Gaussian)
hidden units that become the code. The stack is unrolled: the encoder takes
the weights W, the decoder starts from W transposed (tied), then both are
fine-tuned separately (untied) by the ordinary trainer with backprop.
The schedule follows the paper's code: batch 100, learning rate 0.1
(0.001 for the top RBM), momentum 0.5 for 5 epochs then 0.9, weight cost 2e-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aeserve.models.base import ModelConfig
from aeserve.models.config import Count, NonNegative, Positive, Size, Sizes
from aeserve.models.mlp import MLPAutoencoder, MLPConfig


@dataclass(frozen=True)
class RBMConfig(ModelConfig):
    code_dim: Size = 30
    hidden: Sizes = (1000, 500, 250)
    pretrain: bool = True  # False: the same network from random initialisation (the comparison run)
    pretrain_epochs: Count = 10
    pretrain_batch_size: Size = 100
    pretrain_lr: Positive = 0.1
    top_lr: Positive = 0.001
    weight_cost: NonNegative = 2e-4
    initial_momentum: float = 0.5
    final_momentum: float = 0.9
    momentum_switch_epoch: Count = 5


@dataclass
class RBM:
    """Weights (n_visible, n_hidden) and biases of one trained RBM, with its per-epoch reconstruction errors."""

    weights: torch.Tensor
    visible_bias: torch.Tensor
    hidden_bias: torch.Tensor
    gaussian_hidden: bool
    errors: list[float]

    def hidden_mean(self, v: torch.Tensor) -> torch.Tensor:
        pre = v @ self.weights + self.hidden_bias
        return pre if self.gaussian_hidden else torch.sigmoid(pre)

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(h @ self.weights.T + self.visible_bias)


def reconstruction_error(rbm: RBM, v: torch.Tensor) -> float:
    """Summed squared error per example of the mean-field reconstruction v -> h -> v."""
    return float((rbm.visible_mean(rbm.hidden_mean(v)) - v).pow(2).sum(dim=1).mean())


def train_rbm(data: torch.Tensor, n_hidden: int, gaussian_hidden: bool, config: RBMConfig, epochs: int | None = None) -> RBM:
    """CD-1 on data (n, n_visible) in [0, 1]; uses torch's global RNG (seeded by the trainer)."""
    n, n_visible = data.shape
    epochs = config.pretrain_epochs if epochs is None else epochs
    lr = config.top_lr if gaussian_hidden else config.pretrain_lr
    rbm = RBM(0.1 * torch.randn(n_visible, n_hidden), torch.zeros(n_visible), torch.zeros(n_hidden), gaussian_hidden, [])
    velocity = [torch.zeros_like(rbm.weights), torch.zeros_like(rbm.visible_bias), torch.zeros_like(rbm.hidden_bias)]
    batch = config.pretrain_batch_size
    for epoch in range(epochs):
        momentum = config.initial_momentum if epoch < config.momentum_switch_epoch else config.final_momentum
        order = torch.randperm(n)
        for start in range(0, n, batch):
            v0 = data[order[start:start + batch]]
            h0 = rbm.hidden_mean(v0)
            # Sample the hidden states: Bernoulli for logistic units, unit-variance Gaussian noise for linear ones.
            h_sample = h0 + torch.randn_like(h0) if gaussian_hidden else torch.bernoulli(h0)
            v1 = rbm.visible_mean(h_sample)
            h1 = rbm.hidden_mean(v1)
            m = len(v0)
            gradients = [
                (v0.T @ h0 - v1.T @ h1) / m - config.weight_cost * rbm.weights,
                (v0 - v1).mean(dim=0),
                (h0 - h1).mean(dim=0),
            ]
            for vel, grad, param in zip(velocity, gradients, (rbm.weights, rbm.visible_bias, rbm.hidden_bias), strict=True):
                vel.mul_(momentum).add_(grad, alpha=lr)
                param.add_(vel)
        rbm.errors.append(reconstruction_error(rbm, data[: min(n, 5000)]))
    return rbm


class RBMAutoencoder(MLPAutoencoder):
    """The paper's network: logistic hidden units, a linear code layer, a logistic output, pre-trained by RBMs."""

    kind = "rbm"
    config_class = RBMConfig

    def __init__(self, config: RBMConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(MLPConfig(code_dim=config.code_dim, hidden=config.hidden, activation="sigmoid", output="sigmoid"), input_shape)
        self.config = config

    def prepare(self, x_train: torch.Tensor) -> dict[str, Any]:
        if not self.config.pretrain:
            return {"pretrained": False}
        encoder_layers = [m for m in self.encoder if isinstance(m, torch.nn.Linear)]
        decoder_layers = [m for m in self.decoder if isinstance(m, torch.nn.Linear)][::-1]
        activity, errors = x_train, []
        with torch.no_grad():
            for i, (enc, dec) in enumerate(zip(encoder_layers, decoder_layers, strict=True)):
                top = i == len(encoder_layers) - 1
                rbm = train_rbm(activity, enc.out_features, gaussian_hidden=top, config=self.config)
                # Unroll: encoder W, decoder W^T; they are separate parameters, so fine-tuning unties them.
                enc.weight.copy_(rbm.weights.T)
                enc.bias.copy_(rbm.hidden_bias)
                dec.weight.copy_(rbm.weights)
                dec.bias.copy_(rbm.visible_bias)
                errors.append(rbm.errors)
                activity = rbm.hidden_mean(activity)
        return {"pretrained": True, "rbm_reconstruction_errors": [[round(e, 4) for e in layer] for layer in errors]}
