"""Work spread over DataLoader worker processes (how an image folder is decoded), in order, with DataErrors intact."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from aeserve.training.data.dataset import DataError


def decoding_workers(workers: int) -> int:
    """data.workers, at most the CPUs this process may run on; 0 in a daemonic process, which may not start any."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(workers, cpus)


@dataclass(frozen=True)
class _Failed:
    """A task's DataError, passed back from a worker process as a value (DataLoader would re-raise it reworded)."""

    message: str


class _Tasks(torch.utils.data.Dataset):
    """Task k, ``work(args[k])``, as a map-style dataset, so that a DataLoader runs the tasks in its worker processes."""

    def __init__(self, work: Callable[[Any], Any], args: list[Any]) -> None:
        self.work, self.args = work, args

    def __len__(self) -> int:
        return len(self.args)

    def __getitem__(self, k: int) -> Any:
        try:
            return self.work(self.args[k])
        except DataError as e:
            return _Failed(str(e))


def _as_is(item: Any) -> Any:
    return item


def in_parallel(work: Callable[[Any], Any], args: list[Any], workers: int) -> Iterator[Any]:
    """work(a) for each of ``args`` in that order, whatever the number of workers: computed by ``workers`` DataLoader
    worker processes, each up to two tasks ahead of what is taken (DataLoader's prefetch), or here one by one when
    ``workers`` is 0 or there is a single task. A task's DataError is raised here, worded as the task worded it.
    ``work`` must be picklable (a bound method of a dataclass, a partial of one) where processes are spawned."""
    if workers == 0 or len(args) <= 1:
        yield from map(work, args)
        return
    iterator = iter(torch.utils.data.DataLoader(_Tasks(work, args), batch_size=None, num_workers=min(workers, len(args)), collate_fn=_as_is))
    try:
        for result in iterator:
            if isinstance(result, _Failed):
                raise DataError(result.message)
            yield result
    finally:  # also when the consumer stops early (a bad file, an exception in training): no worker outlives the pass
        iterator._shutdown_workers()
