"""Dynamic batching: rows from concurrent requests for the same version and call run as one model call.

One worker per (version, call) takes whatever is queued (up to ``max_batch_rows`` rows, waiting at most ``max_wait``
for more), has the engines run it (``engines.py``) and hands each request its own slice of the outputs. Inputs are
validated before they get here; if a batched call still fails, each request is retried alone so one bad request fails
only itself.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aeserve.service.errors import Overloaded

Outputs = tuple[np.ndarray, ...]


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future


Run = Callable[[Any, Any, np.ndarray], Awaitable[Outputs]]  # (version, call, rows) -> outputs: Engines.run


class Batcher:
    def __init__(self, run: Run, max_batch_rows: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[Any, Any, Outputs, float], None] | None = None) -> None:
        self.run = run
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda version, call, outputs, seconds: None)  # each model call's outputs and seconds, on the loop
        self._queues: dict[tuple[int, Any], asyncio.Queue[_Pending]] = {}
        self._workers: dict[tuple[int, Any], asyncio.Task] = {}
        self.pending = 0  # requests queued or running, over all workers

    async def submit(self, version: Any, call: Any, rows: np.ndarray) -> Outputs:
        """``call`` (hashable) of ``version`` on ``rows`` (n, ...) float32, batched with other requests for the same;
        Overloaded when ``max_queue`` requests are already waiting."""
        if self.pending >= self.max_queue:
            raise Overloaded(f"overloaded: {self.pending} requests are waiting; retry shortly", retry_after=1)
        if len(rows) >= self.max_batch_rows:
            # Already a full batch: no reason to queue it behind others' rows.
            self.pending += 1
            try:
                return await self._run(version, call, rows)
            finally:
                self.pending -= 1
        key = (id(version), call)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._workers[key] = asyncio.create_task(self._work(version, call, queue))
        future = asyncio.get_running_loop().create_future()
        self.pending += 1
        queue.put_nowait(_Pending(rows, future))
        try:
            return await future
        finally:
            self.pending -= 1

    async def _run(self, version: Any, call: Any, rows: np.ndarray) -> Outputs:
        """One model call of ``rows``; once it succeeds, ``on_batch`` gets its version, call, outputs and seconds."""
        began = time.perf_counter()
        outputs = await self.run(version, call, rows)
        self.on_batch(version, call, outputs, time.perf_counter() - began)
        return outputs

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        batch = [await queue.get()]
        rows = len(batch[0].rows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while rows < self.max_batch_rows:
            if queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = queue.get_nowait()
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _work(self, version: Any, call: Any, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            batch = await self._collect(queue)
            batch = [p for p in batch if not p.future.done()]  # drop requests whose client went away
            if not batch:
                continue
            try:
                rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
                outputs = await self._run(version, call, rows)
            except Exception:
                await self._one_by_one(version, call, batch)
                continue
            start = 0
            for pending in batch:
                stop = start + len(pending.rows)
                if not pending.future.done():
                    pending.future.set_result(tuple(o[start:stop] for o in outputs))
                start = stop

    async def _one_by_one(self, version: Any, call: Any, batch: list[_Pending]) -> None:
        for pending in batch:
            try:
                result = await self.run(version, call, pending.rows)
            except Exception as e:
                if not pending.future.done():
                    pending.future.set_exception(e)
            else:
                if not pending.future.done():
                    pending.future.set_result(result)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
