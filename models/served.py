"""A version served from the ONNX graphs stored with it: numpy and ONNX Runtime, no torch.

Publishing stores a version's graphs (``models/export.py``, ``graphs_for_serving``) in its folder, each listed in the
manifest's ``files`` with its sha256, and the manifest's ``graphs`` says which is which:

    "graphs": {"opset": 18, "files": {"encode": "graphs/encode.onnx", "decode": "graphs/decode.onnx",
               "project": "graphs/project.onnx"}, "coding": "graphs/coding.safetensors", "checked": "..."}

``encode`` maps model-space rows (n, input_dim) to codes (n, code_dim), ``decode`` codes back, ``project`` codes to
map coordinates (n, 2); preprocessing stays outside the graphs (``models/outputs.py`` applies it, as for torch).
``project`` is absent when the projector does not export (t-SNE), and ``coding`` (a version with an entropy model) holds
its streams' probability tables. A version whose graphs did not export or did not match torch has
``"graphs": {"error": "..."}`` and no graph files; one published before graphs were stored has no ``graphs``.

``ServedVersion`` answers the same calls as ``ModelVersion`` (models/version.py), through ``models/outputs.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aeserve.models.anomaly import AnomalyScore
from aeserve.models.files import MANIFEST, WEIGHTS, CheckpointError, fitted_state, read_folder, scoring, state_shapes
from aeserve.models.outputs import OUTPUTS, Call, CodeQuantization, NumpyGraphs, compute
from aeserve.models.preprocessing import Preprocessing
from aeserve.models.streams import RangeCoder, StreamFormat

GRAPHS_DIR = "graphs"
CODING = f"{GRAPHS_DIR}/coding.safetensors"
FULL_INSTALL = "serve it with the full install (pip install aeserve, with torch), or publish it again with this release to store its graphs"


def graph_file(name: str) -> str:
    return f"{GRAPHS_DIR}/{name}.onnx"


class NoGraphs(CheckpointError):
    """A version without stored graphs, loaded where there is no torch to run it."""


def torch_installed() -> bool:
    """Whether torch imports here: the full install, or a slim one that serves stored graphs alone."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_session(graph: bytes, threads: int = 0) -> Any:
    """An ONNX Runtime session on the CPU for one graph; ``threads`` 0: one per core. Workers sleep between calls rather
    than spin, so an idle session leaves the cores to the event loop."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def coding_bytes(pmf: np.ndarray, channel_of: np.ndarray) -> bytes:
    """A version's probability tables (channels, symbols) and each code position's table (code_dim,), as safetensors."""
    from safetensors.numpy import save

    return save({"pmf": np.ascontiguousarray(pmf, dtype=np.float32), "channel_of": np.ascontiguousarray(channel_of, dtype=np.int64)})


def stored_graphs(manifest: dict[str, Any], files: dict[str, bytes]) -> dict[str, bytes]:
    """Graph name -> ONNX bytes, from a manifest's ``graphs`` and the version's verified ``files``; {} without graphs."""
    section = manifest.get("graphs")
    paths = section.get("files") if isinstance(section, dict) else None
    if not isinstance(paths, dict) or not all(path in files for path in paths.values()):
        return {}
    return {name: files[path] for name, path in paths.items()}


def lists_graphs(folder: Path) -> bool:
    """Whether a version folder's manifest names stored graphs (not yet verified: loading does that)."""
    try:
        section = json.loads((Path(folder) / MANIFEST).read_text()).get("graphs")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(section, dict) and isinstance(section.get("files"), dict)


def graphs_serve(graphs: Any, call: Call) -> bool:
    """Whether graphs of these names run all of ``call``: map coordinates need the projector's, which may not export."""
    return "coordinates" not in call.outputs or "project" in graphs


class VersionFacts:
    """What a loaded version says of itself from its manifest and preprocessing, on torch or served from its graphs."""

    manifest: dict[str, Any]
    preprocessing: Preprocessing

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.preprocessing.input_shape


@dataclass
class ServedVersion(VersionFacts):
    """A loaded version on ONNX Runtime, with every core. All methods take and return numpy float32 arrays, shaped as
    ``ModelVersion``'s."""

    manifest: dict[str, Any]
    preprocessing: Preprocessing
    anomaly: AnomalyScore
    graphs: dict[str, bytes]  # graph name -> ONNX model bytes, verified against the manifest
    folder: Path | None = None
    code_quantization: CodeQuantization | None = None
    coding: tuple[np.ndarray, np.ndarray] | None = None  # (pmf, channel_of) for a version with an entropy model
    device: str = "cpu"
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._sessions = {name: onnx_session(graph) for name, graph in self.graphs.items()}
        self._inputs = {name: session.get_inputs()[0].name for name, session in self._sessions.items()}
        self._graphs = NumpyGraphs(self.preprocessing, self.graph)
        self.streams = None if self.coding is None else StreamFormat(self.name, self.version, RangeCoder(*self.coding))

    @property
    def code_dim(self) -> int:
        return int(self.manifest["code_dim"])

    def graph(self, name: str, x: np.ndarray) -> np.ndarray:
        """(n, d) float32 through graph ``name`` -> its output (n, ...) float32."""
        return self._sessions[name].run(None, {self._inputs[name]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def serves(self, call: Call) -> bool:
        return graphs_serve(self.graphs, call)

    def run(self, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The outputs ``call`` asks for (models/outputs.py); ValueError for map coordinates without a projector graph."""
        if not self.serves(call):
            raise ValueError(f"version {self.name}:{self.version} has no ONNX graph for map coordinates (its {self.manifest.get('projector', {}).get('kind')} "
                             f"projector does not export); {FULL_INSTALL}")
        return compute(self._graphs, self.anomaly, call, rows)

    def warm(self) -> None:
        """Run every graph once so the first request pays no one-off costs."""
        outputs = tuple(o for o in OUTPUTS if graphs_serve(self.graphs, Call("inputs", (o,))))
        self.run(Call("codes", ("reconstruction",)), self.run(Call("inputs", outputs), np.zeros((1, *self.input_shape), np.float32))[0])


def load_served(folder: Path) -> ServedVersion:
    """Load and verify one version folder for serving from its stored graphs. Raises CheckpointError naming the file and
    the problem, NoGraphs for a version without graphs."""
    from safetensors.numpy import load as load_safetensors_bytes

    folder = Path(folder)
    manifest, weights, files = read_folder(folder)
    section = manifest.get("graphs")
    if not isinstance(section, dict) or "files" not in section:
        why = f"its graphs did not export or match torch: {section['error']}" if isinstance(section, dict) and "error" in section \
            else "it was published before versions stored them"
        raise NoGraphs(f"{folder}: no ONNX graphs stored ({why}), and this server has no torch to run it; {FULL_INSTALL}")
    try:
        input_dim = Preprocessing(tuple(manifest["preprocessing"]["input_shape"])).input_dim
        code_dim = int(manifest["code_dim"])
        scores = scoring(manifest, folder)
        paths = {str(name): str(path) for name, path in section["files"].items()}
        coding_path = section.get("coding")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder / MANIFEST}: invalid manifest ({type(e).__name__}: {e})") from None
    unlisted = [path for path in [*paths.values(), *([coding_path] if coding_path else [])] if path not in files]
    if unlisted or not {"encode", "decode"} <= set(paths):
        raise CheckpointError(f"{folder / MANIFEST}: graphs must name the encode and decode graphs, each a file listed in files "
                              f"(graphs {sorted(paths)}, not listed {unlisted})")
    try:
        tensors = load_safetensors_bytes(weights)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{folder / WEIGHTS}: not a valid safetensors file ({e})") from None
    expected = state_shapes(manifest, scores, input_dim, code_dim, folder)
    wrong = [k for k, shape in expected.items() if k not in tensors or tensors[k].shape != shape or tensors[k].dtype != np.float32]
    if wrong:
        raise CheckpointError(f"{folder / WEIGHTS}: tensors missing, of the wrong shape or not float32: {wrong}")
    preprocessing, anomaly, code_quantization = fitted_state(manifest, scores, {k: tensors[k] for k in expected}, folder)
    coding = None
    if coding_path:
        try:
            tables = load_safetensors_bytes(files[coding_path])
            coding = (tables["pmf"], tables["channel_of"])
        except Exception as e:  # safetensors' own error types, a missing table
            raise CheckpointError(f"{folder / coding_path}: not the probability tables of a version ({type(e).__name__}: {e})") from None
    try:
        return ServedVersion(manifest, preprocessing, anomaly, {name: files[path] for name, path in paths.items()}, folder, code_quantization, coding)
    except Exception as e:  # onnxruntime's own error types for a graph it cannot load
        raise CheckpointError(f"{folder}: its stored graphs do not load on ONNX Runtime ({type(e).__name__}: {e})") from None
