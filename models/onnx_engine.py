"""ONNX Runtime for small batches: a version's graphs, exported by torch, run where torch is slow.

A torch forward pass lets go of the GIL at every operator, about eight times
for the default MLP's encoder. In the server the event loop holds the GIL most
of the time, so under load the model thread waited 2.3-3.8 ms of a 16-row
batch's 4.5-6.6 ms just to get it back. ONNX Runtime runs the whole graph in
one call that lets go of the GIL once, and its kernels are also faster on few
rows on this CPU: one row 195 vs 515 us, 16 rows 50 vs 84 us per row, one
thread each (``benchmarks/model_threads.py``). From about 128 rows on, torch
on both cores is faster (128 rows: 38 vs 43 us per row), so calls of
``SMALL_BATCH_ROWS`` rows or more stay on torch.

The graphs (``encode``: model-space inputs -> codes, ``decode``: codes ->
model-space outputs, ``project``: codes -> map coordinates) are exported with
torch's ONNX exporter in a child process: exporting imports about 150 MB of
compiler machinery (torch.export, sympy, onnxscript) that the server would
otherwise keep for life, and the child never holds the server's GIL. A graph
that does not export (the t-SNE projector's neighbour search) is left to
torch. Before a version uses its engine, the engine is checked against torch
on sample rows; a version whose graphs fail to export or differ is served by
torch alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from aeserve.models.small_batches import OnnxEngine
from torch import nn

if TYPE_CHECKING:
    from aeserve.models.checkpoint import ModelVersion  # which imports this module

log = logging.getLogger("aeserve.onnx")

OPSET = 18
GRAPHS = ("encode", "decode", "project")
# float32 kernels differ between torch and ONNX Runtime; a check fails beyond this, relative to the outputs' scale.
TOLERANCE = 1e-3


class _Served(nn.Module):
    """A version's graphs as one module, ``(x, z) -> (encode(x), decode(z)[, project(z)])``: one export call builds the
    exporter's operator table once (about 1.8 s of each call), and ``onnx.utils.Extractor`` then cuts out each graph."""

    def __init__(self, model: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.projector = projector

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = (self.model.encode(x), self.model.decode(z))
        return outputs if self.projector is None else (*outputs, self.projector(z))


def export_graphs(version: ModelVersion) -> tuple[dict[str, bytes], dict[str, str]]:
    """(graph name -> ONNX model bytes, graph name -> why it did not export) for a CPU ModelVersion."""
    import onnx.utils

    # The exporter warns about every torchvision operator it cannot register, and about its own internals.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    examples = (torch.zeros(2, version.preprocessing.input_dim), torch.zeros(3, version.code_dim))
    batch = torch.export.Dim.DYNAMIC
    failed: dict[str, str] = {}
    for projector in (version.projector, None):  # without the projector when it does not export (t-SNE's neighbour search)
        names = GRAPHS if projector is not None else GRAPHS[:2]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(_Served(version.model, projector).eval(), examples, input_names=["x", "z"],
                                            output_names=list(names), dynamic_shapes=({0: batch}, {0: batch}),
                                            opset_version=OPSET, dynamo=True, optimize=False, verbose=False)
        except Exception as e:  # the exporter raises many kinds; any of them means "torch serves these graphs"
            failed[names[-1]] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            continue
        extractor = onnx.utils.Extractor(program.model_proto)
        graphs = {name: extractor.extract_model(["z" if name != "encode" else "x"], [name]) for name in names}
        return {name: graph.SerializeToString() for name, graph in graphs.items()}, failed
    return {}, failed


def mismatch(version: ModelVersion, engine: OnnxEngine) -> str | None:
    """Why ``engine`` cannot stand in for torch on ``version``, or None: each graph against torch on 1 and 3 sample rows."""
    rng = np.random.default_rng(0)
    pre = version.preprocessing
    for n in (1, 3):
        x = (pre.offset + rng.random((n, pre.input_dim)) / pre.scale).astype(np.float32)  # the training data's range
        with torch.inference_mode():
            x_model = torch.from_numpy(pre.to_model(x))
            codes = version.model.encode(x_model)
            expected = {"encode": codes, "decode": version.model.decode(codes), "project": version.projector(codes)}
            inputs = {"encode": x_model.numpy(), "decode": codes.numpy(), "project": codes.numpy()}
        for graph, want in expected.items():
            if not engine.has(graph):
                continue
            try:
                got = engine.run(graph, inputs[graph])
            except Exception as e:  # onnxruntime's own error types
                return f"{graph} failed on {n} row(s): {type(e).__name__}: {e}"
            want = want.numpy()
            if got.shape != want.shape:
                return f"{graph} gave shape {got.shape} for {n} row(s), torch {want.shape}"
            scale = max(1.0, float(np.abs(want).max()))
            if not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE * scale):
                return f"{graph} differs from torch by up to {float(np.abs(got - want).max()):.3g} on {n} row(s)"
    return None


class EngineExport:
    """Graph exports for version folders, running in a child process from construction; ``attach`` collects them.

    Start it before loading the versions in the server: the child (which loads
    the same folders itself) works on the other core meanwhile. ``attach`` may
    run while the versions already serve: a version's engine is set once, and a
    call looks for it when it starts.
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self._out = tempfile.TemporaryDirectory(prefix="aeserve-onnx-")
        self._stderr = Path(self._out.name) / "stderr.txt"
        with open(self._stderr, "w") as stderr:  # a file, not a pipe: a chatty child never blocks on it
            self._child = subprocess.Popen([sys.executable, "-m", "aeserve.models.onnx_engine", self._out.name, *map(str, self.folders)],
                                           stdout=subprocess.DEVNULL, stderr=stderr)

    def attach(self, versions: list[ModelVersion], timeout_s: float = 600,
               on_engine: Callable[[ModelVersion, dict[str, bytes]], None] | None = None) -> None:
        """Give each version (from these folders, on the CPU) an engine for its small batches, or log why it stays on torch.

        ``on_engine(version, graphs)`` runs for each version that got its engine, with the graphs' ONNX bytes.
        """
        try:
            try:
                self._child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
                log.warning("small batches stay on torch: the ONNX export took over %.0f s", timeout_s)
                return
            if self._child.returncode != 0:
                tail = (self._stderr.read_text(errors="replace").strip().splitlines() or [f"exit status {self._child.returncode}"])[-1]
                log.warning("small batches stay on torch: the ONNX export failed: %s", tail)
                return
            for version in versions:
                if version.device.type == "cpu" and version.folder in self.folders:
                    graphs = self._attach(version, Path(self._out.name) / str(self.folders.index(version.folder)))
                    if graphs is not None and on_engine is not None:
                        on_engine(version, graphs)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs and remove its files."""
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._out.cleanup()

    @staticmethod
    def _attach(version: ModelVersion, out: Path) -> dict[str, bytes] | None:
        """The graphs, once ``version`` runs its small batches on them; None (logged) if it stays on torch."""
        key = f"{version.name}:{version.version}"
        try:
            report = json.loads((out / "report.json").read_text())
            graphs = {name: (out / f"{name}.onnx").read_bytes() for name in report["graphs"]}
        except (OSError, ValueError, KeyError) as e:
            log.warning("small batches of %s stay on torch: no export (%s)", key, e)
            return None
        if "encode" not in graphs or "decode" not in graphs:
            log.warning("small batches of %s stay on torch: %s", key, report["failed"])
            return None
        try:
            engine = OnnxEngine(graphs)
        except Exception as e:  # onnxruntime's own error types
            log.warning("small batches of %s stay on torch: %s: %s", key, type(e).__name__, e)
            return None
        why = mismatch(version, engine)  # which also warms every session
        if why is not None:
            log.warning("small batches of %s stay on torch: %s", key, why)
            return None
        version.engine = engine
        on_torch = f"; on torch: {report['failed']}" if report["failed"] else ""
        log.info("small batches of %s run on ONNX Runtime (%s)%s", key, ", ".join(sorted(graphs)), on_torch)
        return graphs


def _child(argv: list[str]) -> None:
    """``python -m aeserve.models.onnx_engine OUT FOLDER...``: OUT/i/{graph}.onnx and OUT/i/report.json for the i-th folder."""
    from aeserve.models.checkpoint import load_version

    parser = argparse.ArgumentParser(description=_child.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the server is busy on the other cores
    for i, folder in enumerate(args.folders):
        try:
            graphs, failed = export_graphs(load_version(folder, "cpu"))
        except Exception as e:  # a folder the server refuses too; the others still export
            graphs, failed = {}, {"load": f"{type(e).__name__}: {e}"}
        (args.out / str(i)).mkdir(parents=True)
        for name, graph in graphs.items():
            (args.out / str(i) / f"{name}.onnx").write_bytes(graph)
        (args.out / str(i) / "report.json").write_text(json.dumps({"graphs": sorted(graphs), "failed": failed}))


if __name__ == "__main__":
    _child(sys.argv[1:])
