"""ONNX export: onnxruntime gives the served outputs for every model kind, at any batch size."""
import json

import numpy as np
import pytest

from aeserve.cli import main
from tests.conftest import KIND_CONFIGS

pytestmark = pytest.mark.slow  # torch's ONNX exporter for every kind

ort = pytest.importorskip("onnxruntime")

# float32 kernels differ between PyTorch and onnxruntime: absolute tolerance on codes and on pixel values (0..16).
CODE_ATOL = 1e-4
DATA_ATOL = 1e-3


@pytest.mark.parametrize("kind", sorted(KIND_CONFIGS))
def test_onnx_outputs_match_the_served_ones(trained_registry, tmp_path, kind, capsys):
    name = f"digits-{kind}"
    assert main(["export", f"{name}:1", "--format", "onnx", "--out", str(tmp_path), "--registry", str(trained_registry.root)]) == 0
    assert "encoder.onnx" in capsys.readouterr().out
    info = json.loads((tmp_path / "export.json").read_text())
    assert (info["name"], info["version"], info["input_shape"]) == (name, 1, [8, 8])
    version = trained_registry.load(name)
    encoder = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"))
    for n in (1, 7):
        x = (np.random.default_rng(n).random((n, 8, 8)) * 16).astype(np.float32)
        codes = encoder.run(["code"], {"input": x})[0]
        np.testing.assert_allclose(codes, version.encode(x), atol=CODE_ATOL)
        decoded = decoder.run(["output"], {"code": codes})[0]
        assert decoded.shape == (n, 8, 8)
        np.testing.assert_allclose(decoded, version.decode(codes), atol=DATA_ATOL)
