"""The ONNX exporter: a version's graphs as ONNX models, written by torch's exporter.

Two uses, one exporter:

- ``export_onnx`` writes ``encoder.onnx`` and ``decoder.onnx`` for apps that compute codes in-process, preprocessing
  folded in. ``encoder.onnx``: input ``input`` float32 (n, *input_shape) in the data's own units -> output ``code``
  (n, code_dim); ``decoder.onnx``: input ``code`` float32 (n, code_dim) -> output ``output`` (n, *input_shape) in the
  data's units. The batch dimension is dynamic; outputs match the service's encode and decode.
- ``export_graphs`` gives ONNX Runtime the model-space graphs ``encode`` (x -> codes), ``decode`` (codes -> x) and
  ``project`` (codes -> map coordinates), which ``models/outputs.py`` combines; ``check_graphs`` runs them against
  torch. Publishing stores the graphs that pass with the version (``graphs_for_serving``; the format is in
  models/served.py), and a server exports those of a version published without them.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aeserve.models.served import CODING, coding_bytes, graph_file, onnx_session
from aeserve.models.version import ModelVersion

OPSET = 18
GRAPHS = ("encode", "decode", "project")
# float32 kernels differ between torch and ONNX Runtime; a check fails beyond this, relative to the outputs' scale.
TOLERANCE = 1e-3
CHECK_ROWS = (1, 3)


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


def check_graphs(version: ModelVersion, graphs: dict[str, bytes]) -> str | None:
    """Why ``graphs`` cannot stand in for torch on ``version``, or None: each graph on ONNX Runtime against torch on 1
    and 3 sample rows in the training data's range."""
    try:
        sessions = {name: onnx_session(graph, threads=1) for name, graph in graphs.items()}
    except Exception as e:  # onnxruntime's own error types
        return f"the graphs do not load on ONNX Runtime: {type(e).__name__}: {e}"
    rng = np.random.default_rng(0)
    pre = version.preprocessing
    for n in CHECK_ROWS:
        x = (pre.offset + rng.random((n, pre.input_dim)) / pre.scale).astype(np.float32)
        with torch.inference_mode():
            x_model = torch.from_numpy(pre.to_model(x))
            codes = version.model.encode(x_model)
            expected = {"encode": codes, "decode": version.model.decode(codes), "project": version.projector(codes)}
            inputs = {"encode": x_model.numpy(), "decode": codes.numpy(), "project": codes.numpy()}
        for graph, session in sessions.items():
            try:
                got = session.run(None, {session.get_inputs()[0].name: inputs[graph]})[0]
            except Exception as e:  # onnxruntime's own error types
                return f"{graph} failed on {n} row(s): {type(e).__name__}: {e}"
            want = expected[graph].numpy()
            if got.shape != want.shape:
                return f"{graph} gave shape {got.shape} for {n} row(s), torch {want.shape}"
            scale = max(1.0, float(np.abs(want).max()))
            if not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE * scale):
                return f"{graph} differs from torch by up to {float(np.abs(got - want).max()):.3g} on {n} row(s)"
    return None


def graphs_for_serving(version: ModelVersion) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(files for the version folder, the manifest's ``graphs`` section) for a CPU ModelVersion about to be published.

    Graphs that do not export, or differ from torch, are not stored: the section then says why, and only a server
    with torch serves the version.
    """
    try:
        graphs, failed = export_graphs(version)
        why = check_graphs(version, graphs) if {"encode", "decode"} <= set(graphs) else f"the encoder or decoder did not export: {failed}"
    except Exception as e:  # the exporter's and ONNX's many error types: the version publishes all the same
        graphs, failed, why = {}, {}, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    if why is not None:
        return {}, {"error": why}
    files = {graph_file(name): graph for name, graph in graphs.items()}
    section: dict[str, Any] = {"opset": OPSET, "files": {name: graph_file(name) for name in graphs},
                               "checked": f"against torch on {' and '.join(map(str, CHECK_ROWS))} rows, within {TOLERANCE:g} of the outputs' scale"}
    if failed:
        section["not_exported"] = failed
    tables = version.model.coding_tables()
    if tables is not None:
        files[CODING] = coding_bytes(*tables)
        section["coding"] = CODING
    return files, section
