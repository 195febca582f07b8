"""ONNX export of a version's encoder and decoder, preprocessing included, for apps that compute codes in-process.

``encoder.onnx``: input ``input`` float32 (n, *input_shape) in the data's own units -> output ``code`` (n, code_dim).
``decoder.onnx``: input ``code`` float32 (n, code_dim) -> output ``output`` (n, *input_shape) in the data's units.
The batch dimension is dynamic. Outputs match the service's encode and decode.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from aeserve.models.checkpoint import ModelVersion
from torch import nn

OPSET = 18


class ServedEncoder(nn.Module):
    def __init__(self, version: ModelVersion) -> None:
        super().__init__()
        self.model = version.model
        self.input_dim = version.preprocessing.input_dim
        self.offset = float(version.preprocessing.offset)
        self.scale = float(version.preprocessing.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode((x.reshape(-1, self.input_dim) - self.offset) * self.scale)


class ServedDecoder(nn.Module):
    def __init__(self, version: ModelVersion) -> None:
        super().__init__()
        self.model = version.model
        self.input_shape = tuple(version.input_shape)
        self.offset = float(version.preprocessing.offset)
        self.scale = float(version.preprocessing.scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.model.decode(z) / self.scale + self.offset).reshape(-1, *self.input_shape)


def export_onnx(version: ModelVersion, out: Path) -> list[Path]:
    """Write encoder.onnx, decoder.onnx and export.json (names, shapes, source version) into ``out``."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise RuntimeError("ONNX export needs onnx and onnxscript (dependencies of aeserve): pip install onnx onnxscript") from None
    # torch's exporter warns about every torchvision operator it cannot register; none of them is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    version.model.to("cpu").eval()
    example_x = torch.zeros(2, *version.input_shape)
    example_z = torch.zeros(2, version.code_dim)
    written = []
    for module, example, in_name, out_name, filename in (
        (ServedEncoder(version), example_x, "input", "code", "encoder.onnx"),
        (ServedDecoder(version), example_z, "code", "output", "decoder.onnx"),
    ):
        program = torch.onnx.export(module.eval(), (example,), input_names=[in_name], output_names=[out_name],
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), opset_version=OPSET, dynamo=True, verbose=False)
        program.save(str(out / filename))
        written.append(out / filename)
    info = {"name": version.name, "version": version.version, "sha256": version.manifest["sha256"], "opset": OPSET,
            "input_shape": list(version.input_shape), "code_dim": version.code_dim,
            "encoder": {"file": "encoder.onnx", "input": "input", "output": "code"},
            "decoder": {"file": "decoder.onnx", "input": "code", "output": "output"}}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return [*written, out / "export.json"]
