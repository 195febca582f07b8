"""2-D projectors for the map: fitted on training codes at training time, applied to new codes without refitting.

- ``pca``: the top two principal directions of the training codes (identity for 2-D codes).
- ``umap``: a small network trained with a parametric UMAP loss (McInnes et al. 2018; Sainburg,
  McInnes & Gentner 2021) to keep each training code's nearest neighbours close on the map.
- ``tsne``: a t-SNE layout of the training codes (van der Maaten & Hinton 2008, computed with
  openTSNE's FFT-accelerated gradients, Linderman et al. 2019), stored with the codes it was
  computed from; a new point goes to the medoid of where its nearest training codes went.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from annotated_types import Ge, Interval
from torch import nn

from aeserve.models.config import Config, Count, Positive, Size, Sizes
from aeserve.models.mlp import layer_stack
from aeserve.models.pca import principal_components


class ProjectorConfig(Config):
    """Base of each projector kind's config dataclass: its keys are the [projector] table's."""

    section = "projector"


@dataclass(frozen=True)
class PCAProjectorConfig(ProjectorConfig):
    pass


class PCAProjector(nn.Module):
    """Affine map from codes (n, code_dim) to map coordinates (n, 2), float32."""

    kind: ClassVar[str] = "pca"
    config_class: ClassVar[type[ProjectorConfig]] = PCAProjectorConfig

    def __init__(self, code_dim: int, config: PCAProjectorConfig | None = None) -> None:
        super().__init__()
        self.code_dim = int(code_dim)
        self.config = config or PCAProjectorConfig()
        # Fitted state, set by fit().
        self.register_buffer("mean", torch.zeros(code_dim))
        self.register_buffer("components", torch.zeros(2, code_dim))
        if code_dim >= 2:  # the first two axes; not torch.eye, which on the meta device imports torch._dynamo (docs/serving.md)
            self.components.diagonal().fill_(1.0)

    def fit(self, codes: torch.Tensor) -> dict[str, Any]:
        if self.code_dim == 1:
            self.components.zero_()
            self.components[0, 0] = 1.0
        elif self.code_dim > 2:
            mean, components = principal_components(codes, 2)
            self.mean.copy_(mean)
            self.components.copy_(components)
        return {}

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) @ self.components.T


@dataclass(frozen=True)
class UMAPProjectorConfig(ProjectorConfig):
    n_neighbors: Size = 15
    hidden: Sizes = (256, 256)
    epochs: Size = 20
    batch_size: Size = 2048  # neighbour pairs per step
    negatives: Size = 5  # random pairs pushed apart per neighbour pair
    lr: Positive = 1e-3
    min_dist: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    max_points: Size = 60_000  # fit on at most this many training codes


def umap_curve(min_dist: float, spread: float = 1.0) -> tuple[float, float]:
    """UMAP's a, b such that 1 / (1 + a d^(2b)) fits 1 for d < min_dist, exp(-(d - min_dist) / spread) beyond."""
    d = torch.linspace(0, 3 * spread, 300, dtype=torch.float64)
    target = torch.where(d < min_dist, torch.ones_like(d), torch.exp(-(d - min_dist) / spread))
    params = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)  # log a, log b
    optimiser = torch.optim.LBFGS([params], max_iter=200)

    def closure():
        optimiser.zero_grad()
        a, b = params.exp()
        loss = ((1 / (1 + a * d.clamp_min(1e-12) ** (2 * b)) - target) ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    a, b = params.detach().exp().tolist()
    return a, b


def nearest_neighbours(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Indices (n, k) of each row's k nearest other rows (Euclidean), by chunked exact search."""
    squared = x.pow(2).sum(dim=1)
    result = []
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        distances = squared[start:start + chunk, None] - 2 * block @ x.T + squared[None, :]
        distances[torch.arange(len(block)), torch.arange(start, start + len(block))] = math.inf  # not itself
        result.append(distances.topk(k, dim=1, largest=False).indices)
    return torch.cat(result)


class UMAPProjector(nn.Module):
    """Network codes (n, code_dim) -> (n, 2): standardise, then an MLP trained on the neighbour graph."""

    kind: ClassVar[str] = "umap"
    config_class: ClassVar[type[ProjectorConfig]] = UMAPProjectorConfig

    def __init__(self, code_dim: int, config: UMAPProjectorConfig | None = None) -> None:
        super().__init__()
        self.code_dim = int(code_dim)
        self.config = config or UMAPProjectorConfig()
        self.net = layer_stack([self.code_dim, *self.config.hidden, 2], nn.ReLU)
        # Fitted state: standardisation of the codes, set by fit().
        self.register_buffer("mean", torch.zeros(code_dim))
        self.register_buffer("scale", torch.ones(code_dim))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net((codes - self.mean) / self.scale)

    def fit(self, codes: torch.Tensor) -> dict[str, Any]:
        """Train on training codes (n, code_dim); uses torch's global RNG (seeded by the trainer)."""
        config = self.config
        codes = codes[torch.randperm(len(codes))[: config.max_points]] if len(codes) > config.max_points else codes
        self.mean.copy_(codes.mean(dim=0))
        self.scale.copy_(codes.std(dim=0).clamp_min(1e-6))
        x = (codes - self.mean) / self.scale
        k = min(config.n_neighbors, len(x) - 1)
        neighbours = nearest_neighbours(x, k)
        heads = torch.arange(len(x)).repeat_interleave(k)
        tails = neighbours.reshape(-1)
        a, b = umap_curve(config.min_dist)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        losses = []
        for _ in range(config.epochs):
            order = torch.randperm(len(heads))
            total = 0.0
            for start in range(0, len(order), config.batch_size):
                edge = order[start:start + config.batch_size]
                i, j = heads[edge], tails[edge]
                negative = torch.randint(len(x), (len(edge) * config.negatives,))
                y = self.net(torch.cat([x[i], x[j], x[negative]]))
                yi, yj, yn = y[: len(edge)], y[len(edge): 2 * len(edge)], y[2 * len(edge):]
                positive_d2 = (yi - yj).pow(2).sum(dim=1)
                negative_d2 = (yi.repeat_interleave(config.negatives, dim=0) - yn).pow(2).sum(dim=1)
                # Cross-entropy of UMAP's low-dimensional similarity q = 1 / (1 + a d^2b): pull neighbours, push random pairs.
                q_positive = 1 / (1 + a * positive_d2.clamp_min(1e-10) ** b)
                q_negative = 1 / (1 + a * negative_d2.clamp_min(1e-10) ** b)
                loss = -(q_positive.clamp_min(1e-4).log().mean() + config.negatives * (1 - q_negative).clamp_min(1e-4).log().mean())
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(edge)
            losses.append(round(total / len(heads), 4))
        return {"projector_losses": losses, "projector_points": len(x)}


@dataclass(frozen=True)
class TSNEProjectorConfig(ProjectorConfig):
    perplexity: Positive = 30.0
    dof: Positive = 1.0  # degrees of freedom of the map's Student-t kernel; below 1 separates clusters more
    neighbours: Size = 8  # a new point goes to the medoid of its this many nearest training codes' map positions
    max_points: Annotated[int, Ge(2)] = 60_000  # lay out at most this many training codes
    points: Count = 0  # set by fit: how many training codes the map keeps

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.points > self.max_points:  # a relation between two keys, which field types cannot state
            raise ValueError(f"projector.points must be <= projector.max_points = {self.max_points}, got {self.points}")


class TSNEProjector(nn.Module):
    """Codes (n, code_dim) -> (n, 2): the medoid of the map positions of the nearest stored training codes.

    The stored training codes are the t-SNE's own inputs. A new point lands on the
    map position, among those of its ``neighbours`` nearest training codes, that is
    closest to the others (their medoid): always on a real training point, never
    between clusters as a mean would, and not on a lone neighbour that t-SNE put in
    another cluster. Chosen on the validation split of Fashion-MNIST among 1, 3, 5
    and 8 neighbours, plain and rank-weighted medoids (benchmarks/map.py).
    """

    kind: ClassVar[str] = "tsne"
    config_class: ClassVar[type[ProjectorConfig]] = TSNEProjectorConfig
    chunk: ClassVar[int] = 128  # queries per distance block (128 x 60k floats, 31 MB): the fastest size measured

    def __init__(self, code_dim: int, config: TSNEProjectorConfig | None = None) -> None:
        super().__init__()
        self.code_dim = int(code_dim)
        self.config = config or TSNEProjectorConfig()
        self.register_buffer("codes", torch.zeros(self.config.points, code_dim))
        self.register_buffer("coords", torch.zeros(self.config.points, 2))
        # Derived, not stored: the codes' squared norms, recomputed whenever the codes are set.
        self.register_buffer("squared_norms", torch.zeros(self.config.points), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._derive())

    def _derive(self) -> None:
        self.squared_norms = self.codes.pow(2).sum(dim=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if len(self.codes) == 0:
            raise RuntimeError("the t-SNE projector has not been fitted")
        k = min(self.config.neighbours, len(self.codes))
        placed = []
        for block in codes.split(self.chunk):
            distances = torch.addmm(self.squared_norms, block, self.codes.T, alpha=-2)  # squared distance minus |block|^2, (b, n)
            nearest = distances.topk(k, dim=1, largest=False).indices  # (b, k)
            candidates = self.coords[nearest]  # (b, k, 2)
            medoid = torch.cdist(candidates, candidates).sum(dim=2).argmin(dim=1)  # (b,)
            placed.append(candidates[torch.arange(len(block)), medoid])
        return torch.cat(placed) if placed else codes.new_zeros(0, 2)

    def fit(self, codes: torch.Tensor) -> dict[str, Any]:
        """Lay out training codes (n, code_dim); seeded from torch's global RNG (seeded by the trainer)."""
        from openTSNE import TSNE

        config = self.config
        if len(codes) < 4:
            raise ValueError(f"the t-SNE projector needs at least 4 training codes, got {len(codes)}")
        codes = codes[torch.randperm(len(codes))[: config.max_points]] if len(codes) > config.max_points else codes
        perplexity = min(config.perplexity, (len(codes) - 1) / 3)  # t-SNE needs 3 * perplexity neighbours
        seed = int(torch.randint(2**31 - 1, ()))
        layout = TSNE(perplexity=perplexity, dof=config.dof, n_jobs=torch.get_num_threads(), random_state=seed).fit(codes.double().numpy())
        self.config = dataclasses.replace(config, points=len(codes))
        self.codes = codes.float().contiguous().clone()
        self.coords = torch.from_numpy(np.asarray(layout, dtype=np.float32))
        self._derive()
        return {"projector_points": len(codes), "projector_kl_divergence": round(float(layout.kl_divergence), 4)}


PROJECTOR_KINDS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (PCAProjector, UMAPProjector, TSNEProjector)}


def build_projector(kind: str, code_dim: int, config: dict[str, Any] | None = None) -> nn.Module:
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"unknown projector kind {kind!r}; allowed: {sorted(PROJECTOR_KINDS)}")
    cls = PROJECTOR_KINDS[kind]
    return cls(code_dim, cls.config_class.from_dict(config or {}, kind))


def projector_manifest(projector: nn.Module) -> dict[str, Any]:
    return {"kind": projector.kind, "config": dataclasses.asdict(projector.config)}
