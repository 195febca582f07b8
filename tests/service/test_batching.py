"""The batcher: concurrent rows share model calls, each request gets its own rows back, failures stay local."""
import asyncio
import threading

import numpy as np
import pytest
from aeserve.service.batching import Batcher, ModelThreads
from aeserve.service.errors import ApiError


class Doubler:
    """A stand-in model method: doubles its rows, records batch sizes, and can be held to let a queue build."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, rows: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        if (rows == -1).any():
            raise ValueError("poisoned row")
        self.calls.append(len(rows))
        return rows * 2


async def test_concurrent_requests_are_batched_and_split():
    model, batches, seconds = Doubler(), [], []
    batcher = Batcher(max_batch_rows=64, max_wait_s=0, max_queue=100,
                      on_batch=lambda rows, took: (batches.append(rows), seconds.append(took)))
    model.gate.clear()  # the first call holds; the others queue behind it
    first = asyncio.create_task(batcher.submit(model.run, np.full((1, 3), 100.0, np.float32)))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(batcher.submit(model.run, np.full((i + 1, 3), float(i), np.float32))) for i in range(10)]
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
    batcher = Batcher(max_batch_rows=64, max_wait_s=0, max_queue=100)
    model.gate.clear()
    blocker = asyncio.create_task(batcher.submit(model.run, np.zeros((1, 2), np.float32)))
    await asyncio.sleep(0.05)
    good = asyncio.create_task(batcher.submit(model.run, np.ones((2, 2), np.float32)))
    bad = asyncio.create_task(batcher.submit(model.run, -np.ones((1, 2), np.float32)))
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
    batcher = Batcher(max_batch_rows=64, max_wait_s=0, max_queue=2)
    model.gate.clear()
    held = [asyncio.create_task(batcher.submit(model.run, np.zeros((1, 2), np.float32))) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ApiError) as refused:
        await batcher.submit(model.run, np.zeros((1, 2), np.float32))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    model.gate.set()
    await asyncio.gather(*held)
    assert (await batcher.submit(model.run, np.ones((1, 2), np.float32)))[0].tolist() == [[2.0, 2.0]]
    await batcher.close()


async def test_wait_gathers_rows_that_arrive_later():
    model = Doubler()
    # A full batch (4 rows) goes at once; the generous wait only matters on a badly loaded machine.
    batcher = Batcher(max_batch_rows=4, max_wait_s=5.0, max_queue=100)
    tasks = []
    for _ in range(4):
        tasks.append(asyncio.create_task(batcher.submit(model.run, np.ones((1, 2), np.float32))))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert model.calls == [4]
    await batcher.close()


async def test_before_call_runs_in_the_model_thread_with_each_calls_rows():
    model, seen = Doubler(), []
    batcher = Batcher(max_batch_rows=4, max_wait_s=0, max_queue=100,
                      before_call=lambda rows: seen.append((rows, threading.current_thread().name)))
    await batcher.submit(model.run, np.ones((2, 3), np.float32))
    await batcher.submit(model.run, np.ones((9, 3), np.float32))  # a full batch on its own
    assert [rows for rows, _ in seen] == [2, 9]
    assert all(name.startswith("aeserve-model") for _, name in seen)
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


class Tripler:
    """A stand-in remote: takes calls of ``accepted`` under ``limit`` rows on the event loop, or fails them all."""

    def __init__(self, accepted, limit: int = 4, fail: bool = False) -> None:
        self.accepted, self.limit, self.fail = accepted, limit, fail
        self.calls: list[int] = []

    def accepts(self, fn, rows: int) -> bool:
        return fn == self.accepted and rows < self.limit

    def run(self, fn, rows: np.ndarray) -> asyncio.Future:
        assert threading.current_thread() is threading.main_thread()  # straight from the event loop
        future = asyncio.get_running_loop().create_future()
        self.calls.append(len(rows))
        if self.fail:
            future.set_exception(RuntimeError("the remote is gone"))
        else:
            future.set_result((rows * 3,))
        return future


async def test_a_remote_takes_the_calls_it_accepts_and_model_threads_the_rest():
    model, other = Doubler(), Doubler()
    remote = Tripler(model.run)
    batcher = Batcher(max_batch_rows=8, max_wait_s=0, max_queue=100, remote=remote)
    (small,) = await batcher.submit(model.run, np.ones((3, 2), np.float32))
    (big,) = await batcher.submit(model.run, np.ones((5, 2), np.float32))  # over the remote's limit
    (full,) = await batcher.submit(model.run, np.ones((9, 2), np.float32))  # a full batch on its own
    (elsewhere,) = await batcher.submit(other.run, np.ones((1, 2), np.float32))  # a method the remote does not take
    assert remote.calls == [3] and model.calls == [5, 9] and other.calls == [1]
    assert small.tolist() == [[3.0, 3.0]] * 3 and big[0].tolist() == full[0].tolist() == elsewhere[0].tolist() == [2.0, 2.0]
    await batcher.close()


async def test_calls_a_remote_fails_run_on_model_threads(caplog):
    model = Doubler()
    remote = Tripler(model.run, fail=True)
    batcher = Batcher(max_batch_rows=2, max_wait_s=0, max_queue=100, remote=remote)
    results = await asyncio.gather(*(batcher.submit(model.run, np.full((1, 2), float(i), np.float32)) for i in range(3)))
    (direct,) = await batcher.submit(model.run, np.ones((3, 2), np.float32))  # a full batch on its own, under the remote's limit
    assert [r[0].tolist() for r in results] == [[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 4.0]]] and direct.tolist() == [[2.0, 2.0]] * 3
    assert sum(remote.calls) == sum(model.calls) == 6
    assert "failed outside the server (the remote is gone)" in caplog.text
    await batcher.close()
