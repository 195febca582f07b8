"""Convolutional autoencoder for images: strided convolutions down, transposed convolutions up.

Between convolutions, either a pointwise activation or GDN (generalized divisive normalization, the compression
models' nonlinearity: each channel divided by a learned norm of all channels at that pixel; its inverse in the
decoder). GDN's joint normalisation fits images' local statistics better than a pointwise unit does, at a higher
cost per epoch (docs/benchmarks.md, "Quality", has the comparison behind configs/fmnist-64d.toml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from annotated_types import MinLen
from torch import nn
from torch.nn import functional as F

from aeserve.models.base import Autoencoder, ModelConfig
from aeserve.models.config import Size, Sizes
from aeserve.models.entropy import GDN
from aeserve.models.mlp import ACTIVATIONS

ConvActivation = Literal[(*ACTIVATIONS, "gdn")]


@dataclass(frozen=True)
class ConvConfig(ModelConfig):
    code_dim: Size = 64
    channels: Annotated[Sizes, MinLen(1)] = (32, 64)  # one stride-2 stage each: every stage halves height and width
    activation: ConvActivation = "gelu"  # "gdn": GDN in the encoder, inverse GDN in the decoder
    loss: Literal["bce", "mse"] = "bce"  # cross-entropy summed over pixels, or summed squared error (what eval reports)


def image_shape(input_shape: tuple[int, ...], stages: int) -> tuple[int, int, int]:
    """(H, W) or (C, H, W) -> (C, H, W), checking that H and W survive ``stages`` halvings."""
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"kind 'conv' needs image inputs of shape (H, W) or (C, H, W), got {list(input_shape)}; "
                         "arrays are (n, H, W) for one channel or channels first: (n, C, H, W)")
    if input_shape[-1] in (1, 3, 4) and input_shape[0] not in (1, 3, 4):
        raise ValueError(f"kind 'conv' needs image inputs channels first: (n, C, H, W), or (n, H, W) for one channel; rows of shape "
                         f"{list(input_shape)} look channels last (H, W, C): move the channels with np.moveaxis(x, -1, 1), "
                         "or read image files with data.source = 'images'")
    factor = 2 ** stages
    if input_shape[1] % factor or input_shape[2] % factor:
        raise ValueError(f"image height and width {list(input_shape[1:])} must be divisible by {factor} for {stages} stages; "
                         "use fewer model.channels")
    return input_shape  # type: ignore[return-value]


class ConvAutoencoder(Autoencoder):
    kind = "conv"
    config_class = ConvConfig

    def __init__(self, config: ConvConfig, input_shape: tuple[int, ...]) -> None:
        super().__init__(config, input_shape)
        stages = len(config.channels)
        self.image = image_shape(self.input_shape, stages)
        channels, height, width = self.image
        self.bottom = (config.channels[-1], height // 2 ** stages, width // 2 ** stages)

        def act(c: int, inverse: bool = False) -> nn.Module:
            return GDN(c, inverse=inverse) if config.activation == "gdn" else ACTIVATIONS[config.activation]()

        down: list[nn.Module] = []
        for c_in, c_out in zip((channels, *config.channels[:-1]), config.channels, strict=True):
            down += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), act(c_out), nn.Conv2d(c_out, c_out, 3, padding=1), act(c_out)]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(math.prod(self.bottom), config.code_dim))
        c_bottom = self.bottom[0]
        up: list[nn.Module] = [nn.Linear(config.code_dim, math.prod(self.bottom)), nn.Unflatten(1, self.bottom), act(c_bottom, True)]
        reversed_channels = config.channels[::-1]
        for i, (c_in, c_out) in enumerate(zip(reversed_channels, (*reversed_channels[1:], channels), strict=True)):
            last = i == stages - 1
            up += [nn.Conv2d(c_in, c_in, 3, padding=1), act(c_in, True), nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)]
            if not last:
                up.append(act(c_out, True))
        self.decoder_net = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(-1, *self.image))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_net(z).reshape(-1, self.input_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decode_logits(self.encode(x))
        if self.config.loss == "mse":
            return (torch.sigmoid(logits) - x).pow(2).sum() / len(x)
        # Cross-entropy summed over pixels, as for the mlp with logistic output.
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
