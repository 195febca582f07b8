"""The engine process: small batches in a child process answer exactly as the in-process engine, and failures stay contained."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aeserve.models.small_batches import SMALL_BATCH_ROWS
from aeserve.service.engine_process import EngineProcess, EngineProcessError

from tests.conftest import KIND_CONFIGS

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(onnx_exported) -> dict:
    """kind -> (version with its in-process engine, its graphs' ONNX bytes)."""
    versions, graphs = onnx_exported
    return {kind: (versions[kind], graphs[kind]) for kind in KIND_CONFIGS}


@pytest.fixture
async def process():
    engine = EngineProcess()
    await engine.start()
    yield engine
    await engine.close()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 8, 8)) * 16).astype(np.float32)


async def test_every_operation_answers_as_the_in_process_engine(exported, process):
    for version, graphs in exported.values():
        await process.load(version, graphs)
    assert process.versions() == len(exported)
    for kind, (version, _) in exported.items():
        for n in (1, 5):
            x = rows(n)
            codes = version.encode(x)  # the in-process engine: same graphs, same ONNX Runtime, one thread
            want = {"encode": (codes,), "decode": (version.decode(codes),), "reconstruct": version.reconstruct(x),
                    "project": (version.project(x),)}
            for op, expected in want.items():
                fn = getattr(version, op)
                assert process.accepts(fn, n), (kind, op)
                got = await process.run(fn, codes if op == "decode" else x)
                assert len(got) == len(expected), (kind, op)
                for g, e in zip(got, expected, strict=True):
                    assert g.shape == e.shape and g.dtype == e.dtype, (kind, op)
                    np.testing.assert_array_equal(g, e, err_msg=f"{kind} {op} on {n} rows")


async def test_only_small_calls_of_loaded_versions_and_exported_graphs_are_accepted(exported, process):
    mlp, graphs = exported["mlp"]
    pca, _ = exported["pca"]
    assert not process.accepts(mlp.encode, 1)  # not loaded yet
    await process.load(mlp, {name: data for name, data in graphs.items() if name != "project"})
    assert process.accepts(mlp.encode, SMALL_BATCH_ROWS - 1) and process.accepts(mlp.reconstruct, 1)
    assert not process.accepts(mlp.encode, SMALL_BATCH_ROWS)  # torch is faster from here on
    assert not process.accepts(mlp.project, 1)  # no projector graph: torch projects
    assert not process.accepts(pca.encode, 1)
    assert not process.accepts(np.sum, 1)


async def test_a_failing_call_fails_alone(exported, process):
    mlp, graphs = exported["mlp"]
    await process.load(mlp, graphs)
    wrong_width = np.zeros((2, 5), np.float32)  # the graph wants 64 numbers per row
    bad, good = process.run(mlp.decode, wrong_width), process.run(mlp.encode, rows(3))
    with pytest.raises(EngineProcessError, match="decode|INVALID_ARGUMENT|Got invalid dimensions"):
        await bad
    np.testing.assert_array_equal((await good)[0], mlp.encode(rows(3)))


async def test_graphs_that_do_not_load_are_refused_and_the_process_serves_on(exported, process):
    mlp, graphs = exported["mlp"]
    pca, _ = exported["pca"]
    with pytest.raises(EngineProcessError, match="InvalidProtobuf|Fail|protobuf"):
        await process.load(pca, {"encode": b"not a graph", "decode": b"nor this"})
    assert not process.accepts(pca.encode, 1)
    await process.load(mlp, graphs)
    np.testing.assert_array_equal((await process.run(mlp.encode, rows(2)))[0], mlp.encode(rows(2)))


async def test_a_dead_process_fails_the_calls_in_flight_and_takes_no_more(exported, process):
    mlp, graphs = exported["mlp"]
    await process.load(mlp, graphs)
    in_flight = [process.run(mlp.encode, rows(1, seed)) for seed in range(20)]
    process._child.kill()
    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    assert any(isinstance(o, EngineProcessError) for o in outcomes)  # the later ones, at least, never got an answer
    for outcome in outcomes:
        assert isinstance(outcome, EngineProcessError | tuple)
    assert not process.up and process.versions() == 0 and not process.accepts(mlp.encode, 1)
    with pytest.raises(EngineProcessError, match="not running"):
        await process.load(mlp, graphs)


async def test_take_moves_a_version_out_of_the_server(exported, process):
    mlp, graphs = exported["mlp"]
    engine = mlp.engine
    try:
        await asyncio.to_thread(process.take, mlp, graphs)  # as the registry refresh calls it, from its thread
        assert mlp.engine is None and process.accepts(mlp.encode, 1)
        np.testing.assert_allclose((await process.run(mlp.encode, rows(2)))[0], mlp._encode_torch(rows(2)), atol=1e-4)
    finally:
        mlp.engine = engine  # the module's other tests compare with it


def test_the_child_imports_neither_torch_nor_the_web_stack():
    """What keeps it at about 90 MB instead of 300 (importing torch alone takes 217 MB)."""
    import subprocess
    import sys

    code = "import sys, service.engine_process; print(sorted({'torch', 'fastapi', 'starlette'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
