"""Where a call runs: small calls on the small engine where it serves them, the rest on torch, decided in one place."""
import asyncio
import threading

import numpy as np
import pytest
import torch

from aeserve.models.outputs import OUTPUTS, Call
from aeserve.service.runtime import torch_engine
from aeserve.service.runtime.engines import SMALL_BATCH_ROWS, Engines
from aeserve.service.runtime.torch_engine import ONE_THREAD_ROWS
from tests.conftest import KIND_CONFIGS

ENCODE, PROJECT = Call("inputs", ("code",)), Call("inputs", ("coordinates",))


class Tripler:
    """A stand-in small engine: serves ``encode`` of the versions it has on the event loop, or fails every call."""

    def __init__(self, version, fail: bool = False) -> None:
        self.version, self.fail = version, fail
        self.calls: list[int] = []

    def serves(self, version, call) -> bool:
        return version is self.version and call == ENCODE

    def run(self, version, call, rows: np.ndarray) -> asyncio.Future:
        assert threading.current_thread() is threading.main_thread()  # straight from the event loop
        future = asyncio.get_running_loop().create_future()
        self.calls.append(len(rows))
        if self.fail:
            future.set_exception(RuntimeError("the engine is gone"))
        else:
            future.set_result((np.full((len(rows), 4), 3.0, np.float32),))
        return future


@pytest.fixture
def mlp(trained_registry):
    return trained_registry.load("digits-mlp")


async def test_small_calls_the_small_engine_serves_go_there_and_torch_runs_the_rest(mlp, trained_registry):
    engines = Engines("cpu", "torch")
    engines.small = small = Tripler(mlp)
    other = trained_registry.load("digits-pca")
    x = np.random.default_rng(0).random((SMALL_BATCH_ROWS, 64)).astype(np.float32) * 16
    (served,) = await engines.run(mlp, ENCODE, x[:3])
    assert small.calls == [3] and (served == 3.0).all()
    for version, call, rows in ((mlp, ENCODE, x), (mlp, PROJECT, x[:3]), (other, ENCODE, x[:3])):  # too big, not served, not taken
        np.testing.assert_array_equal((await engines.run(version, call, rows))[0], version.run(call, rows)[0])
    assert small.calls == [3]
    await engines.close()


async def test_calls_the_small_engine_fails_run_on_torch(mlp, caplog):
    engines = Engines("cpu", "torch")
    engines.small = small = Tripler(mlp, fail=True)
    x = np.ones((2, 64), np.float32)
    (codes,) = await engines.run(mlp, ENCODE, x)
    np.testing.assert_array_equal(codes, mlp.encode(x))
    assert small.calls == [2] and "failed on ONNX Runtime (the engine is gone); running it on torch" in caplog.text
    await engines.close()


async def test_torch_runs_small_calls_on_one_thread_and_big_ones_on_every_core(mlp, monkeypatch):
    engines = Engines("cpu", "torch")
    engines.torch.threads = 2
    seen = []
    run = mlp.run
    monkeypatch.setattr(mlp, "run", lambda call, rows: seen.append((len(rows), torch.get_num_threads(), threading.current_thread().name)) or run(call, rows))
    for n in (1, ONE_THREAD_ROWS - 1, ONE_THREAD_ROWS):
        await engines.run(mlp, ENCODE, np.ones((n, 64), np.float32))
    assert [(n, threads) for n, threads, _ in seen] == [(1, 1), (ONE_THREAD_ROWS - 1, 1), (ONE_THREAD_ROWS, 2)]
    assert all(name.startswith("aeserve-model") for _, _, name in seen)
    await engines.close()


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
async def test_calls_in_blocks_answer_as_one_call_does(kind, trained_registry, monkeypatch):
    version = trained_registry.load(f"digits-{kind}")
    x = np.random.default_rng(0).random((11, *version.input_shape)).astype(np.float32) * 16
    calls = [(Call("inputs", tuple(OUTPUTS)), x), (Call("codes", ("reconstruction",)), version.encode(x))]
    whole = [version.run(call, rows) for call, rows in calls]
    monkeypatch.setattr(torch_engine, "CPU_BLOCK_ROWS", 4)  # blocks of 4, 4 and 3 rows
    engines = Engines("cpu", "torch")
    for (call, rows), one_call in zip(calls, whole, strict=True):
        for in_blocks, want in zip(await engines.run(version, call, rows), one_call, strict=True):
            assert in_blocks.shape == want.shape
            np.testing.assert_allclose(in_blocks, want, rtol=1e-5, atol=1e-5)
    await engines.close()
