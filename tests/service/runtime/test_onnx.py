"""Small batches on ONNX Runtime: the exported graphs answer as torch does, and where they cannot, torch serves."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from aeserve.models.export import check_graphs
from aeserve.models.outputs import OUTPUTS, Call
from aeserve.service.operations import OPERATIONS
from aeserve.service.runtime.engines import SMALL_BATCH_ROWS, Engines, OnnxThreads
from aeserve.service.runtime.export import GraphExport
from aeserve.service.runtime.onnx import OnnxVersion
from tests.conftest import KIND_CONFIGS

pytestmark = pytest.mark.slow  # the ONNX export of every kind

pytest.importorskip("onnxruntime")

# float32 kernels differ between torch and ONNX Runtime: tolerances on codes and on pixel values (0..16).
CODE_ATOL = 1e-4
DATA_ATOL = 1e-3
EVERYTHING = Call("inputs", tuple(OUTPUTS))


def rows(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 8, 8)) * 16).astype(np.float32)


def on_onnx(onnx_exported, name: str) -> tuple:
    versions, graphs = onnx_exported
    version = versions[name]
    return version, OnnxVersion(graphs[name], version.preprocessing, version.anomaly)


def onnx_engines(version, graphs) -> Engines:
    engines = Engines("cpu", "torch")
    engines.small = OnnxThreads(engines.threads)
    engines.small.take(version, graphs)
    return engines


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_every_operation_on_onnx_matches_torch(onnx_exported, kind):
    version, engine = on_onnx(onnx_exported, kind)
    for n in (1, 5):
        x = rows(n)
        np.testing.assert_array_equal(engine.run(Call("inputs", ("code",)), x)[0], engine.graph("encode", version.preprocessing.to_model(x)))
        codes = version.encode(x)
        for call, given in [*((op.call, codes if op.call.takes == "codes" else x) for op in OPERATIONS.values()), (EVERYTHING, x)]:
            assert engine.serves(call)
            for name, got, want in zip(call.outputs, engine.run(call, given), version.run(call, given), strict=True):
                assert got.shape == want.shape and got.dtype == want.dtype, (kind, call, name)
                np.testing.assert_allclose(got, want, atol=CODE_ATOL if name in ("code", "coordinates") else DATA_ATOL, rtol=1e-4)


async def test_large_batches_stay_on_torch(onnx_exported):
    versions, graphs = onnx_exported
    version, engine = on_onnx(onnx_exported, "mlp")
    engines = onnx_engines(version, graphs["mlp"])
    x = rows(SMALL_BATCH_ROWS)
    for call in (Call("inputs", ("code",)), Call("inputs", ("reconstruction", "error"))):
        np.testing.assert_array_equal((await engines.run(version, call, x))[0], version.run(call, x)[0])
        np.testing.assert_array_equal((await engines.run(version, call, x[:-1]))[0], engine.run(call, x[:-1])[0])
    await engines.close()


async def test_a_projector_that_does_not_export_is_left_to_torch(onnx_exported):
    versions, graphs = onnx_exported
    version, engine = on_onnx(onnx_exported, "tsne")
    assert not engine.has("project") and engine.has("encode") and not engine.serves(EVERYTHING)
    engines = onnx_engines(version, graphs["tsne"])
    x = rows(3)
    np.testing.assert_array_equal((await engines.run(version, Call("inputs", ("coordinates",)), x))[0], version.project(x))
    await engines.close()


def test_a_version_the_export_cannot_load_stays_on_torch(onnx_exported, trained_registry, caplog):
    versions, graphs = onnx_exported
    assert "changed" not in graphs and set(graphs) == {*KIND_CONFIGS, "tsne"}
    # The same check, seen in the log, on a fresh export of that folder alone.
    version = trained_registry.load("digits-mlp")
    version.folder = versions["changed"].folder
    taken = []
    with caplog.at_level(logging.WARNING, logger="aeserve.onnx"):
        GraphExport([version.folder]).collect([version], lambda v, g: taken.append(v))
    assert taken == []
    assert "digits-mlp:1 stay on torch" in caplog.text and "sha256" in caplog.text


def test_an_engine_that_differs_from_torch_is_named(onnx_exported):
    versions, graphs = onnx_exported
    assert check_graphs(versions["mlp"], graphs["mlp"]) is None
    why = check_graphs(versions["mlp"], graphs["rbm"])  # same shapes, other weights
    assert why is not None and re.fullmatch(r"(encode|decode) differs from torch by up to [0-9.]+ on 1 row\(s\)", why), why
