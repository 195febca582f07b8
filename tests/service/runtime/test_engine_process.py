"""The engine process: small calls in a child process on ONNX Runtime, fed by the event loop."""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from aeserve.models.anomaly import AnomalyScore, Combined, Neighbors
from aeserve.models.outputs import OUTPUTS, Call
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime import engine_process
from aeserve.service.runtime.engine_process import EngineProcess, EngineProcessError, pack_call, unpack_call
from aeserve.service.runtime.onnx import OnnxVersion
from tests.conftest import KIND_CONFIGS

pytest.importorskip("onnxruntime")
slow = pytest.mark.slow  # the ONNX export of every kind, and child processes
ENCODE, DECODE, PROJECT = (OPERATIONS[op].call for op in ("encode", "decode", "project"))


@pytest.fixture(scope="module")
def exported(onnx_exported) -> dict:
    """kind -> (version, its graphs' ONNX bytes)."""
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


def test_calls_cross_the_socket_as_they_are():
    calls = [op.call for op in OPERATIONS.values()] + [Call("inputs", tuple(OUTPUTS)), Call("inputs", ("percentile", "code"))]
    assert [unpack_call(pack_call(call)) for call in calls] == calls


def test_a_new_output_widens_the_packed_call_instead_of_wrapping_into_the_next(monkeypatch):
    assert len(OUTPUTS) == 7
    names = [*OUTPUTS, "eighth"]  # index 7 plus one is 8: four bits, where seven outputs take three
    monkeypatch.setattr(engine_process, "OUTPUT_NAMES", names)
    calls = [Call("inputs", ("eighth", "code", "score")), Call("inputs", tuple(names))]
    assert [unpack_call(pack_call(call)) for call in calls] == calls
    assert pack_call(Call("inputs", ("eighth",))) == 8 << 1


def test_a_call_whose_outputs_do_not_fit_the_call_field_is_refused(monkeypatch):
    names = [f"output_{i}" for i in range(40)]  # six bits each: ten outputs fit in 64 bits, eleven do not
    monkeypatch.setattr(engine_process, "OUTPUT_NAMES", names)
    assert unpack_call(pack_call(Call("codes", tuple(names[-10:])))) == Call("codes", tuple(names[-10:]))
    with pytest.raises(ValueError, match="a call of 11 outputs, 6 bits each, does not fit the engine process's 64-bit call field"):
        pack_call(Call("inputs", tuple(names[:11])))


@slow
async def test_every_call_answers_as_the_in_process_engine(exported, process):
    for version, graphs in exported.values():
        await process.load(version, graphs)
    assert process.versions() == len(exported)
    for kind, (version, graphs) in exported.items():
        engine = OnnxVersion(graphs, version.preprocessing, version.anomaly)  # same graphs, same ONNX Runtime, one thread
        for n in (1, 5):
            x = rows(n)
            codes = version.encode(x)
            for call in [*(op.call for op in OPERATIONS.values()), Call("inputs", tuple(OUTPUTS))]:
                given = codes if call.takes == "codes" else x
                assert process.serves(version, call), (kind, call)
                got, expected = await process.run(version, call, given), engine.run(call, given)
                assert len(got) == len(expected), (kind, call)
                for g, e in zip(got, expected, strict=True):
                    assert g.shape == e.shape and g.dtype == e.dtype, (kind, call)
                    np.testing.assert_array_equal(g, e, err_msg=f"{kind} {call} on {n} rows")


@slow
async def test_each_kind_of_score_crosses_to_the_child_with_its_arrays(exported, process):
    version, graphs = exported["mlp"]
    codes = version.encode(rows(50, seed=1))
    by = {"combined": version.anomaly, "neighbors": AnomalyScore(version.anomaly.quantiles, Neighbors.fit(codes, k=3, reference_rows=40, seed=0)),
          "error": AnomalyScore(version.anomaly.quantiles, None)}
    assert isinstance(by["combined"].method, Combined)
    scored = Call("inputs", ("score", "percentile"))
    for score, anomaly in by.items():
        variant = dataclasses.replace(version, anomaly=anomaly)
        await process.load(variant, graphs)
        got, expected = await process.run(variant, scored, rows(5)), OnnxVersion(graphs, version.preprocessing, anomaly).run(scored, rows(5))
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e, err_msg=score)
    np.testing.assert_allclose(got[0], version.run(Call("inputs", ("error",)), rows(5))[0], rtol=1e-4)  # the error score is the error


@slow
async def test_only_loaded_versions_and_exported_graphs_are_served(exported, process):
    mlp, graphs = exported["mlp"]
    pca, _ = exported["pca"]
    assert not process.serves(mlp, ENCODE)  # not loaded yet
    await process.load(mlp, {name: data for name, data in graphs.items() if name != "project"})
    assert process.serves(mlp, ENCODE) and process.serves(mlp, OPERATIONS["reconstruct"].call)
    assert not process.serves(mlp, PROJECT)  # no projector graph: torch projects
    assert not process.serves(pca, ENCODE)


@slow
async def test_a_failing_call_fails_alone(exported, process):
    mlp, graphs = exported["mlp"]
    await process.load(mlp, graphs)
    wrong_width = np.zeros((2, 5), np.float32)  # the graph wants 4 numbers per code
    bad, good = process.run(mlp, DECODE, wrong_width), process.run(mlp, ENCODE, rows(3))
    with pytest.raises(EngineProcessError, match="decode|INVALID_ARGUMENT|Got invalid dimensions"):
        await bad
    np.testing.assert_allclose((await good)[0], mlp.encode(rows(3)), atol=1e-4)


@slow
async def test_graphs_that_do_not_load_are_refused_and_the_process_serves_on(exported, process):
    mlp, graphs = exported["mlp"]
    pca, _ = exported["pca"]
    with pytest.raises(EngineProcessError, match="InvalidProtobuf|Fail|protobuf"):
        await process.load(pca, {"encode": b"not a graph", "decode": b"nor this"})
    assert not process.serves(pca, ENCODE)
    await process.load(mlp, graphs)
    np.testing.assert_allclose((await process.run(mlp, ENCODE, rows(2)))[0], mlp.encode(rows(2)), atol=1e-4)


@slow
async def test_a_dead_process_fails_the_calls_in_flight_and_takes_no_more(exported, process):
    mlp, graphs = exported["mlp"]
    await process.load(mlp, graphs)
    in_flight = [process.run(mlp, ENCODE, rows(1, seed)) for seed in range(20)]
    process._child.kill()
    process._child.wait()  # blocking: the event loop must not see the death yet
    after = [process.run(mlp, ENCODE, rows(1, seed)) for seed in range(5)]  # sent before the loop has seen the death
    outcomes = await asyncio.gather(*in_flight, *after, return_exceptions=True)
    assert all(isinstance(o, EngineProcessError) for o in outcomes[20:])  # nobody was left to answer them
    for outcome in outcomes:
        assert isinstance(outcome, EngineProcessError | tuple)
    assert not process.up and process.versions() == 0 and not process.serves(mlp, ENCODE)
    with pytest.raises(EngineProcessError, match="not running"):
        await process.load(mlp, graphs)


@slow
async def test_take_loads_a_version_from_the_refresh_thread(exported, process):
    mlp, graphs = exported["mlp"]
    await asyncio.to_thread(process.take, mlp, graphs)  # as the registry refresh calls it, from its thread
    assert process.serves(mlp, ENCODE)
    np.testing.assert_allclose((await process.run(mlp, ENCODE, rows(2)))[0], mlp.encode(rows(2)), atol=1e-4)


@slow
def test_the_child_imports_neither_torch_nor_the_web_stack():
    """What keeps it at about 90 MB instead of 300 (importing torch alone takes 217 MB)."""
    import subprocess
    import sys

    code = "import sys, aeserve.service.runtime.engine_process; print(sorted({'torch', 'fastapi', 'starlette'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
