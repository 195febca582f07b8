"""The ONNX exporter: a version's graphs as ONNX models, written by torch's exporter.

Two uses, one exporter:

- ``export_onnx`` writes ``encoder.onnx`` and ``decoder.onnx`` for apps that compute codes in-process, preprocessing
  folded in. ``encoder.onnx``: input ``input`` float32 (n, *input_shape) in the data's own units -> output ``code``
  (n, code_dim); ``decoder.onnx``: input ``code`` float32 (n, code_dim) -> output ``output`` (n, *input_shape) in the
  data's units. The batch dimension is dynamic; outputs match the service's encode and decode.
- ``export_graphs`` gives the service's ONNX Runtime engine the model-space graphs ``encode`` (x -> codes),
  ``decode`` (codes -> x) and ``project`` (codes -> map coordinates), which ``models/outputs.py`` combines.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from aeserve.models.version import ModelVersion

OPSET = 18
GRAPHS = ("encode", "decode", "project")


def _onnx_program(module: nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]):
    """torch's exporter (dynamo) with a dynamic batch dimension on every input."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise RuntimeError("ONNX export needs onnx and onnxscript (dependencies of aeserve): pip install onnx onnxscript") from None
    # The exporter warns about every torchvision operator it cannot register, and about its own internals.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.eval(), examples, input_names=input_names, output_names=output_names,
                                 dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in examples),
                                 opset_version=OPSET, dynamo=True, optimize=False, verbose=False)


class _Scaled(nn.Module):
    """The version's preprocessing as constants of the graph: one offset and scale, or one per feature."""

    def __init__(self, version: ModelVersion) -> None:
        super().__init__()
        self.model = version.model
        self.input_dim = version.preprocessing.input_dim
        self.input_shape = tuple(version.input_shape)
        for name in ("offset", "scale"):
            value = getattr(version.preprocessing, name)
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).reshape(-1))


class _RawEncoder(_Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode((x.reshape(-1, self.input_dim) - self.offset) * self.scale)


class _RawDecoder(_Scaled):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.model.decode(z) / self.scale + self.offset).reshape(-1, *self.input_shape)


def export_onnx(version: ModelVersion, out: Path) -> list[Path]:
    """Write encoder.onnx, decoder.onnx and export.json (names, shapes, source version) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    version.model.to("cpu").eval()
    written = []
    for module, example, in_name, out_name, filename in (
        (_RawEncoder(version), torch.zeros(2, *version.input_shape), "input", "code", "encoder.onnx"),
        (_RawDecoder(version), torch.zeros(2, version.code_dim), "code", "output", "decoder.onnx"),
    ):
        _onnx_program(module, (example,), [in_name], [out_name]).save(str(out / filename))
        written.append(out / filename)
    info = {"name": version.name, "version": version.version, "sha256": version.manifest["sha256"], "opset": OPSET,
            "input_shape": list(version.input_shape), "code_dim": version.code_dim,
            "encoder": {"file": "encoder.onnx", "input": "input", "output": "code"},
            "decoder": {"file": "decoder.onnx", "input": "code", "output": "output"}}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return [*written, out / "export.json"]


class _Graphs(nn.Module):
    """A version's graphs as one module, ``(x, z) -> (encode(x), decode(z)[, project(z)])``: one export call builds the
    exporter's operator table once (a fixed cost of every call: docs/serving.md, "Costs the code is shaped by"), and
    ``onnx.utils.Extractor`` then cuts out each graph."""

    def __init__(self, model: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = (self.model.encode(x), self.model.decode(z))
        return outputs if self.projector is None else (*outputs, self.projector(z))


def export_graphs(version: ModelVersion) -> tuple[dict[str, bytes], dict[str, str]]:
    """(graph name -> ONNX model bytes, graph name -> why it did not export) for a CPU ModelVersion.

    ``project`` is left out when the projector does not export (the t-SNE projector's neighbour search).
    """
    import onnx.utils

    examples = (torch.zeros(2, version.preprocessing.input_dim), torch.zeros(3, version.code_dim))
    failed: dict[str, str] = {}
    for projector in (version.projector, None):
        names = GRAPHS if projector is not None else GRAPHS[:2]
        try:
            program = _onnx_program(_Graphs(version.model, projector), examples, ["x", "z"], list(names))
        except Exception as e:  # the exporter raises many kinds; any of them means "torch serves these graphs"
            failed[names[-1]] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            continue
        extractor = onnx.utils.Extractor(program.model_proto)
        graphs = {name: extractor.extract_model(["z" if name != "encode" else "x"], [name]) for name in names}
        return {name: graph.SerializeToString() for name, graph in graphs.items()}, failed
    return {}, failed
