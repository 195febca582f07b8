"""Data-parallel training with PyTorch's DistributedDataParallel.

Two ways in: ``torchrun --nproc-per-node N -m aeserve train CONFIG`` (torchrun
sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or ``aeserve train --nproc N``,
which starts N local processes itself. gloo on CPU, NCCL on GPU. Every rank
sees the same shuffled order and trains on its own slice of each batch;
only rank 0 evaluates and publishes the version.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group_from_env() -> Iterator[World]:
    """Join (and at the end leave) the process group torchrun described in the environment, if any."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend())
    try:
        yield current_world()
    finally:
        if joined:
            dist.destroy_process_group()


class LossModule(nn.Module):
    """Routes the model's own loss through forward(), so DDP can synchronise its gradients."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x)


def loss_step(model: nn.Module) -> nn.Module:
    """What the training loop calls on a batch: the loss, gradient-synchronised across ranks when distributed."""
    step = LossModule(model)
    if current_world().size > 1 and any(p.requires_grad for p in model.parameters()):
        return nn.parallel.DistributedDataParallel(step)
    return step


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the local rendezvous's here, and the servers' that the tests and benchmarks start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend(), rank=rank, world_size=size)
    try:
        result = fn(*args)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()


def spawn(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in nproc local processes forming one process group; returns rank 0's result."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.spawn(_worker, args=(nproc, free_port(), fn, args, results), nprocs=nproc, join=True)
    return results.get()
