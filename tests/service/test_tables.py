"""A table version, its scaling one offset and scale per feature, served by every engine in the data's own units."""
import numpy as np
import pytest

from aeserve.models.outputs import OUTPUTS, Call
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.service.conftest import make_client, wait_ready
from tests.training.test_tables import write_csv

EVERYTHING = Call("inputs", tuple(OUTPUTS))


@pytest.fixture(scope="module")
def table_registry(tmp_path_factory) -> Registry:
    folder = tmp_path_factory.mktemp("tables")
    registry = Registry(folder / "registry")
    run = build_run_config({"name": "rows", "data": {"source": "table", "path": str(write_csv(folder / "rows.csv")), "label": "is_big",
                                                     "categorical": ["colour"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 3, "batch_size": 16, "report": False}})
    train(run, registry, progress=False)
    return registry


def rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    colour = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    return np.concatenate([rng.normal(0.05, 0.01, (n, 1)), rng.normal(2000, 400, (n, 1)), colour], axis=1).astype(np.float32)


def test_table_rows_are_served_in_the_manifests_column_order(table_registry):
    version = table_registry.load("rows")
    x = rows(4)
    with make_client(table_registry) as client:
        wait_ready(client.get)
        answer = client.post("/v1/models/rows/reconstruct", json={"inputs": x.tolist()}).json()
        manifest = client.get("/v1/models/rows").json()
    want = version.reconstruct(x)
    for key, expected in zip(("outputs", "errors", "percentiles"), want, strict=True):
        np.testing.assert_allclose(np.asarray(answer[key], np.float32), expected, rtol=1e-5, atol=1e-4)
    assert [f["name"] for f in manifest["features"]] == ["small", "large", "colour"]
    assert manifest["preprocessing"]["scaling"] == "standard"


@pytest.mark.slow
def test_onnx_runtime_and_the_exported_models_scale_each_feature_as_torch_does(table_registry, tmp_path):
    import onnxruntime as ort

    from aeserve.cli import main
    from aeserve.service.runtime.export import export_checked
    from aeserve.service.runtime.onnx import OnnxVersion

    version = table_registry.load("rows")
    graphs, _, refused = export_checked(version.folder)
    assert refused is None
    engine, x = OnnxVersion(graphs, version.preprocessing, version.quantiles), rows(6)
    for got, want in zip(engine.run(EVERYTHING, x), version.run(EVERYTHING, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert main(["export", "rows:1", "--format", "onnx", "--out", str(tmp_path), "--registry", str(table_registry.root)]) == 0
    codes = ort.InferenceSession(str(tmp_path / "encoder.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(codes, version.encode(x), rtol=1e-4, atol=1e-4)
    decoded = ort.InferenceSession(str(tmp_path / "decoder.onnx")).run(None, {"code": codes})[0]
    np.testing.assert_allclose(decoded, version.decode(codes), rtol=1e-4, atol=1e-2)
