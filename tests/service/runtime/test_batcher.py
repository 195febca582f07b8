"""The batcher: concurrent rows share model calls, each request gets its own rows back, failures stay local."""
import asyncio
import threading

import numpy as np
import pytest

from aeserve.service.api.errors import V1, headers_of, status_of
from aeserve.service.errors import Overloaded
from aeserve.service.runtime.batcher import Batcher
from aeserve.service.runtime.engines import ModelThreads


class Doubler:
    """A stand-in engine: doubles its rows on a model thread, records batch sizes, and can be held to let a queue build."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads = ModelThreads(1)

    def _double(self, rows: np.ndarray) -> tuple[np.ndarray]:
        self.gate.wait(5)
        if (rows == -1).any():
            raise ValueError("poisoned row")
        self.calls.append(len(rows))
        return (rows * 2,)

    def run(self, version, call, rows: np.ndarray) -> asyncio.Future:
        return self.threads.run(self._double, rows)


def batcher_of(model: Doubler, **options) -> Batcher:
    return Batcher(model.run, **options)


def submit(batcher: Batcher, rows: np.ndarray):
    return batcher.submit("a version", "a call", rows)


async def test_concurrent_requests_are_batched_and_split():
    model, batches, seconds = Doubler(), [], []
    batcher = batcher_of(model, max_batch_rows=64, max_wait_s=0, max_queue=100,
                      on_batch=lambda version, call, outputs, took: (batches.append(len(outputs[0])), seconds.append(took)))
    model.gate.clear()  # the first call holds; the others queue behind it
    first = asyncio.create_task(submit(batcher, np.full((1, 3), 100.0, np.float32)))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(submit(batcher, np.full((i + 1, 3), float(i), np.float32))) for i in range(10)]
    await asyncio.sleep(0.05)
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.calls == [1, sum(range(1, 11))]  # ten requests, one model call
    assert batches == model.calls
    assert len(seconds) == len(batches) and all(0 < took < 60 for took in seconds)
    np.testing.assert_array_equal(results[0][0], np.full((1, 3), 200.0))
    for i, (out,) in enumerate(results[1:]):
        np.testing.assert_array_equal(out, np.full((i + 1, 3), 2.0 * i))
    await batcher.close()


async def test_a_failing_request_fails_alone():
    model = Doubler()
    batcher = batcher_of(model, max_batch_rows=64, max_wait_s=0, max_queue=100)
    model.gate.clear()
    blocker = asyncio.create_task(submit(batcher, np.zeros((1, 2), np.float32)))
    await asyncio.sleep(0.05)
    good = asyncio.create_task(submit(batcher, np.ones((2, 2), np.float32)))
    bad = asyncio.create_task(submit(batcher, -np.ones((1, 2), np.float32)))
    await asyncio.sleep(0.05)
    model.gate.set()
    await blocker
    np.testing.assert_array_equal((await good)[0], 2 * np.ones((2, 2)))
    with pytest.raises(ValueError, match="poisoned row"):
        await bad
    assert batcher.pending == 0
    await batcher.close()


async def test_full_queue_answers_503_with_retry_after():
    model = Doubler()
    batcher = batcher_of(model, max_batch_rows=64, max_wait_s=0, max_queue=2)
    model.gate.clear()
    held = [asyncio.create_task(submit(batcher, np.zeros((1, 2), np.float32))) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded) as refused:
        await submit(batcher, np.zeros((1, 2), np.float32))
    assert status_of(refused.value, V1) == 503 and headers_of(refused.value) == {"Retry-After": "1"}
    model.gate.set()
    await asyncio.gather(*held)
    assert (await submit(batcher, np.ones((1, 2), np.float32)))[0].tolist() == [[2.0, 2.0]]
    await batcher.close()


async def test_wait_gathers_rows_that_arrive_later():
    model = Doubler()
    # A full batch (4 rows) goes at once; the generous wait only matters on a badly loaded machine.
    batcher = batcher_of(model, max_batch_rows=4, max_wait_s=5.0, max_queue=100)
    tasks = []
    for _ in range(4):
        tasks.append(asyncio.create_task(submit(batcher, np.ones((1, 2), np.float32))))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert model.calls == [4]
    await batcher.close()


async def test_calls_are_batched_per_version_and_call():
    model = Doubler()
    batcher = batcher_of(model, max_batch_rows=64, max_wait_s=0, max_queue=100)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit("v1", "encode", np.zeros((1, 2), np.float32)))
    await asyncio.sleep(0.05)
    keys = [("v1", "encode"), ("v1", "project"), ("v2", "encode"), ("v1", "encode")]
    rest = [asyncio.create_task(batcher.submit(version, call, np.ones((1, 2), np.float32))) for version, call in keys]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(first, *rest)
    assert sorted(model.calls) == [1, 1, 1, 2]  # the two ("v1", "encode") requests behind the first share a call
    await batcher.close()


async def test_model_threads_answer_results_and_errors_and_survive_what_a_call_raises():
    threads = ModelThreads(1)

    def interrupted() -> None:
        raise SystemExit("stop")  # would end a thread that let it through

    assert await threads.run(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await threads.run(divmod, 1, 0)
    with pytest.raises(RuntimeError, match="interrupted.*SystemExit"):
        await threads.run(interrupted)
    assert await threads.run(threading.current_thread) is threads._threads[0]  # the same thread still serves
    threads.close()


async def test_a_call_cancelled_while_it_runs_is_dropped_and_close_stops_the_threads():
    loop_errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
    threads, gate = ModelThreads(1), threading.Event()
    running = threads.run(gate.wait, 5)
    running.cancel()  # its caller left; setting its answer now would raise in the event loop
    gate.set()
    assert await threads.run(lambda: "next") == "next"  # one thread: answered after the cancelled call's
    assert loop_errors == []
    threads.close()
    for thread in threads._threads:
        thread.join(5)
        assert not thread.is_alive()
