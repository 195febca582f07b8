"""Model kinds by name: the families every trainer and loader builds from a config."""
from __future__ import annotations

from typing import Any

from aeserve.models.base import Autoencoder
from aeserve.models.conv import ConvAutoencoder
from aeserve.models.linear import LinearAutoencoder
from aeserve.models.mlp import MLPAutoencoder
from aeserve.models.pca import PCA
from aeserve.models.rbm import RBMAutoencoder
from aeserve.models.rd import RDAutoencoder
from aeserve.models.vae import VAE

# kind -> model class; each class names its config dataclass. Routes and trainers use this, never `if kind == ...`.
MODEL_KINDS: dict[str, type[Autoencoder]] = {
    cls.kind: cls for cls in (PCA, LinearAutoencoder, MLPAutoencoder, RBMAutoencoder, ConvAutoencoder, VAE, RDAutoencoder)}


def build_model(kind: str, config: dict[str, Any], input_shape: tuple[int, ...]) -> Autoencoder:
    """Build an untrained model of ``kind`` for inputs of ``input_shape`` from its config values."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; allowed: {sorted(MODEL_KINDS)}")
    cls = MODEL_KINDS[kind]
    return cls(cls.config_class.from_dict(config, kind), tuple(input_shape))


__all__ = ["MODEL_KINDS", "build_model"]
