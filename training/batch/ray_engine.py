"""``aeserve encode --engine ray``: the same job, with the model calls on Ray actors.

This process reads the source (training's readers, as ``--engine local``) and writes the Parquet file (atomic as
ever); each block goes to one of the actors, every actor an ``Encoder`` that loaded the version once, by number, from
the registry's location (a path the cluster's machines share, or a URL: each loads through its own local copy). A few
blocks per actor are in flight at once and their answers come back in the source's order, so the file is the one the
local job writes. The cluster is ``$RAY_ADDRESS``'s, else a local one with this machine's cores.

A Ray Data pipeline reaches the same ``Encoder`` without this module (docs/batch.md, "On Ray Data"):
``ray.data.read_parquet(...).map_batches(aeserve.batch.Encoder, fn_constructor_kwargs=dict(registry=..., name=...,
version=...), concurrency=..., batch_size=...)``.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

from aeserve.models.version import ModelVersion
from aeserve.training.batch.encoder import Encoder
from aeserve.training.batch.inputs import Block

IN_FLIGHT_PER_ACTOR = 2  # blocks queued at each actor: one running, one waiting, so none idles between blocks


def connect() -> Any:
    """Ray, connected: to ``$RAY_ADDRESS``'s cluster when set, else to a new local one (no dashboard)."""
    try:
        import ray
    except ImportError as e:
        raise ValueError("--engine ray needs Ray: pip install 'aeserve[ray]'") from e
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    return ray


class _Actor:
    """One actor's Encoder; ``columns`` answers a block's rows."""

    def __init__(self, registry: str, name: str, version: int, codes: str, extras: tuple[str, ...]) -> None:
        self.encoder = Encoder(registry, name, version, codes, extras)

    def columns(self, rows: Any) -> dict:
        return self.encoder.columns(rows)


class RayActors:
    """``actors`` Encoders of ``loaded``'s version (default: one per CPU of the cluster, each on one core)."""

    def __init__(self, registry: str, loaded: ModelVersion, codes: str, extras: tuple[str, ...], actors: int | None = None) -> None:
        self.ray = connect()
        count = actors or max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        remote = self.ray.remote(num_cpus=1)(_Actor)
        self.actors = [remote.remote(registry, loaded.name, int(loaded.version), codes, tuple(extras)) for _ in range(count)]

    def answers(self, blocks: Iterator[Block]) -> Iterator[tuple[Block, dict]]:
        """(block, its columns) in the blocks' order, the blocks spread over the actors in turn."""
        waiting: deque = deque()
        for i, block in enumerate(blocks):
            waiting.append((block, self.actors[i % len(self.actors)].columns.remote(block.rows)))
            if len(waiting) >= IN_FLIGHT_PER_ACTOR * len(self.actors):
                first, answer = waiting.popleft()
                yield first, self.ray.get(answer)
        while waiting:
            first, answer = waiting.popleft()
            yield first, self.ray.get(answer)
