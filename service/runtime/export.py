"""Graphs for the ONNX Runtime engine, exported and checked in a child process while the server loads the versions.

Exporting imports compiler machinery (torch.export, sympy, onnxscript) whose memory the server would keep for life
(docs/serving.md, "Costs the code is shaped by"), and the child never holds the server's GIL. For each version folder the child exports the graphs
(``models/export.py``), runs them on ONNX Runtime against torch on sample rows, and writes the graphs that pass. A
version whose graphs do not export or differ is served by torch alone, and the log says why. The server itself never
imports the exporter, and with the engine process not even ONNX Runtime.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

log = logging.getLogger("aeserve.onnx")

EXPORT_TIMEOUT_S = 600.0


class GraphExport:
    """Graph exports for version folders, running in a child process from construction; ``collect`` hands them out."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        self._out = tempfile.TemporaryDirectory(prefix="aeserve-onnx-")
        self._stderr = Path(self._out.name) / "stderr.txt"
        with open(self._stderr, "w") as stderr:  # a file, not a pipe: a chatty child never blocks on it
            self._child = subprocess.Popen([sys.executable, "-m", "aeserve.service.runtime.export", str(os.getpid()), self._out.name,
                                            *map(str, self.folders)],
                                           stdout=subprocess.DEVNULL, stderr=stderr)

    def collect(self, versions: list[ModelVersion], take: Callable[[ModelVersion, dict[str, bytes]], None],
                timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        """``take(version, graphs)`` for each of ``versions`` (from these folders) whose graphs exported and passed."""
        try:
            try:
                self._child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("small batches stay on torch: the ONNX export took over %.0f s", timeout_s)
                return
            if self._child.returncode != 0:
                tail = (self._stderr.read_text(errors="replace").strip().splitlines() or [f"exit status {self._child.returncode}"])[-1]
                log.warning("small batches stay on torch: the ONNX export failed: %s", tail)
                return
            for version in versions:
                if version.folder in self.folders:
                    graphs = self._graphs(version, Path(self._out.name) / str(self.folders.index(version.folder)))
                    if graphs is not None:
                        take(version, graphs)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs and remove its files."""
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        self._out.cleanup()

    @staticmethod
    def _graphs(version: ModelVersion, out: Path) -> dict[str, bytes] | None:
        key = f"{version.name}:{version.version}"
        try:
            report = json.loads((out / "report.json").read_text())
            graphs = {name: (out / f"{name}.onnx").read_bytes() for name in report["graphs"]}
        except (OSError, ValueError, KeyError) as e:
            log.warning("small batches of %s stay on torch: no export (%s)", key, e)
            return None
        if report["refused"]:
            log.warning("small batches of %s stay on torch: %s", key, report["refused"])
            return None
        on_torch = f"; on torch: {report['failed']}" if report["failed"] else ""
        log.info("small batches of %s can run on ONNX Runtime (%s)%s", key, ", ".join(sorted(graphs)), on_torch)
        return graphs


def export_checked(folder: Path) -> tuple[dict[str, bytes], dict[str, str], str | None]:
    """(graphs, graph -> why it did not export, why the graphs cannot be used or None) for one version folder."""
    from aeserve.models.checkpoint import load_version
    from aeserve.models.export import check_graphs, export_graphs

    try:
        version = load_version(folder, "cpu")
    except Exception as e:  # a folder the server refuses too
        return {}, {}, f"{type(e).__name__}: {e}"
    graphs, failed = export_graphs(version)
    if "encode" not in graphs or "decode" not in graphs:
        return graphs, failed, f"the encoder or decoder did not export: {failed}"
    return graphs, failed, check_graphs(version, graphs)


def _exit_with_parent(out: Path, parent: int, every_s: float = 0.5) -> None:
    """Stop, and remove ``out``, once the server ``parent`` that started this export is gone (this process is then
    someone else's child): a server killed, or exiting on SIGTERM while an export runs, must not leave the child using
    a core and its files in the temporary folder."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        shutil.rmtree(out, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _child(argv: list[str]) -> None:
    """``python -m aeserve.service.runtime.export PARENT_PID OUT FOLDER...``: OUT/i/{graph}.onnx and OUT/i/report.json per
    folder."""
    import torch

    parser = argparse.ArgumentParser(description=_child.__doc__)
    parser.add_argument("parent", type=int, help="the server's process id")
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    _exit_with_parent(args.out, args.parent)
    torch.set_num_threads(1)  # the server is busy on the other cores
    for i, folder in enumerate(args.folders):
        graphs, failed, refused = export_checked(folder)
        (args.out / str(i)).mkdir(parents=True)
        for name, graph in graphs.items():
            (args.out / str(i) / f"{name}.onnx").write_bytes(graph)
        (args.out / str(i) / "report.json").write_text(json.dumps({"graphs": sorted(graphs), "failed": failed, "refused": refused}))


if __name__ == "__main__":
    _child(sys.argv[1:])
