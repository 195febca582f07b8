"""What a version can answer, and how each answer is computed from the model's three graphs.

Torch-free: the same ``compute`` runs a version on torch (``ModelVersion``) and on ONNX Runtime (in the server or in
the engine process, which imports neither torch nor the web stack), so every engine gives every output the same way.

A call takes rows of data (``"inputs"``, (n, *input_shape) raw) or of codes (``"codes"``, (n, code_dim)) and asks
for any of the outputs below; each model graph runs at most once per call, however many outputs need it.

Anomaly scores and their percentiles come from ``models/anomaly.py`` (from the codes and the residual, the codes
alone or the error, as the version's score needs), here too, so every engine scores rows the same way.

Compact codes (``CodeQuantization``) are made from the float codes after the call, with constants fitted once on the
training codes and stored with the version, so every engine gives them the same way too.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from aeserve.models.anomaly import AnomalyScore

Takes = Literal["inputs", "codes"]


@dataclass(frozen=True)
class Output:
    name: str
    description: str
    row_shape: Callable[[Any], tuple[int, ...]]  # a version (anything with input_shape and code_dim) -> one row's shape
    mirrors_input: bool = False  # answered flat or nested, as the rows were sent
    by_default: bool = True  # answered when a request names no outputs (a value per input value is not)


OUTPUTS: dict[str, Output] = {o.name: o for o in (
    Output("code", "codes (n, code_dim)", lambda v: (v.code_dim,)),
    Output("reconstruction", "data in its own units (n, *input_shape)", lambda v: tuple(v.input_shape), mirrors_input=True),
    Output("error", "summed squared error per row, in the model's [0, 1] space (n,)", lambda v: ()),
    Output("score", "the version's anomaly score per row, higher meaning more unusual (n,): models/anomaly.py", lambda v: ()),
    Output("percentile", "where each score falls among the held-out rows' scores, 0-100 (n,)", lambda v: ()),
    Output("coordinates", "2-D map coordinates (n, 2)", lambda v: (2,)),
    Output("feature_error", "squared error of each value, in the model's scaled space (n, input_dim)", lambda v: (v.preprocessing.input_dim,),
           by_default=False),
)}
FROM_CODES = ("reconstruction",)  # what rows of codes can answer


class Call(NamedTuple):
    """One model call's question: what the rows are, and the outputs wanted (names from OUTPUTS, in answer order)."""

    takes: Takes
    outputs: tuple[str, ...]

    def check(self) -> Call:
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown or not self.outputs:
            raise ValueError(f"unknown or no outputs {list(self.outputs)}; allowed: {list(OUTPUTS)}")
        if self.takes == "codes" and set(self.outputs) - set(FROM_CODES):
            raise ValueError(f"from codes the only output is {FROM_CODES[0]!r}, asked for {list(self.outputs)}")
        return self


# How codes may be answered: the model's float32 codes, int8 codes with a per-dimension scale, or binary codes (one
# bit per dimension against a per-dimension threshold, packed 8 per byte: semantic hashing).
CODE_FORMS = ("float", "int8", "binary")
# The int8 scale of a dimension: this quantile of |code| over the training codes, / 127 (codes beyond it saturate at
# ±127). How it was chosen: docs/benchmarks.md, Compact codes.
INT8_SCALE_QUANTILE = 0.999
INT8_MAX = 127


@dataclass(frozen=True)
class CodeQuantization:
    """Fitted per-dimension constants for compact codes, computed from the training codes when a version is published.

    ``scale`` (code_dim,) float32: an int8 code is q = clip(round(z / scale), -127, 127), so z ≈ scale * q (within
    scale / 2 where |z| <= 127.5 * scale). ``threshold`` (code_dim,) float32, the training codes' median: a binary code's
    bit d is z_d > threshold_d, packed 8 per byte with ``numpy.packbits`` (dimension 0 is the first byte's most
    significant bit; the last byte's unused low bits are 0), (n, ceil(code_dim / 8)) uint8.
    """

    scale: np.ndarray
    threshold: np.ndarray

    TENSORS = ("scale", "threshold")  # stored in the weights file as code_quantization.<name>

    @classmethod
    def fit(cls, codes: np.ndarray, scale_quantile: float = INT8_SCALE_QUANTILE) -> CodeQuantization:
        """Fit on training codes (n, code_dim). A dimension that is 0 throughout gets scale 1 (its codes are all 0)."""
        codes = np.asarray(codes, dtype=np.float64)
        extent = np.quantile(np.abs(codes), scale_quantile, axis=0)
        scale = np.where(extent > 0, extent / INT8_MAX, 1.0)
        return cls(scale.astype(np.float32), np.median(codes, axis=0).astype(np.float32))

    def tensors(self) -> dict[str, np.ndarray]:
        """The constants as the weights file holds them: name -> (code_dim,) float32."""
        return {f"code_quantization.{name}": getattr(self, name) for name in self.TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> CodeQuantization:
        return cls(*(np.asarray(tensors[f"code_quantization.{name}"], dtype=np.float32) for name in cls.TENSORS))

    def int8(self, codes: np.ndarray) -> np.ndarray:
        """Float codes (n, code_dim) -> int8 codes (n, code_dim)."""
        return np.clip(np.rint(codes / self.scale), -INT8_MAX, INT8_MAX).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """int8 codes (n, code_dim) -> float32 codes scale * q (n, code_dim)."""
        return (q.astype(np.float32) * self.scale).astype(np.float32)

    def binary(self, codes: np.ndarray) -> np.ndarray:
        """Float codes (n, code_dim) -> packed bits (n, ceil(code_dim / 8)) uint8."""
        return np.packbits(codes > self.threshold, axis=1)

    def compact(self, codes: np.ndarray, form: str) -> np.ndarray:
        """Float codes (n, code_dim) in ``form`` (one of CODE_FORMS)."""
        return codes if form == "float" else self.int8(codes) if form == "int8" else self.binary(codes)

    def constants(self, form: str) -> dict[str, np.ndarray]:
        """What an answer in ``form`` carries so that its codes can be read: {"scale"} for int8, {"threshold"} for binary."""
        return {"int8": {"scale": self.scale}, "binary": {"threshold": self.threshold}}.get(form, {})


class Graphs(Protocol):
    """A version's arithmetic on one backend (torch tensors or numpy arrays); ``T`` is that backend's array type."""

    def to_model(self, x: np.ndarray) -> Any: ...  # raw (n, ...) -> model space (n, input_dim)
    def from_model(self, x: Any) -> np.ndarray: ...  # model space -> raw (n, *input_shape) float32
    def encode(self, x: Any) -> Any: ...  # model space -> codes (n, code_dim)
    def decode(self, z: Any) -> Any: ...  # codes -> model space (n, input_dim)
    def project(self, z: Any) -> Any: ...  # codes -> (n, 2)
    def codes_in(self, z: np.ndarray) -> Any: ...  # numpy codes -> backend
    def numpy(self, t: Any) -> np.ndarray: ...  # backend -> numpy float32
    def squared_error(self, x_hat: Any, x: Any) -> Any: ...  # (n, input_dim) twice -> (n,)
    def squared_errors(self, x_hat: Any, x: Any) -> Any: ...  # (n, input_dim) twice -> (n, input_dim)


# Percentile points kept above the largest held-out score, so that larger scores there still rank higher.
BEYOND_HELD_OUT = 0.1


@functools.lru_cache(maxsize=8)
def _percentile_grid(n: int) -> np.ndarray:
    """The percentiles of ``n`` evenly spaced quantiles, 0 .. 99.9 (read-only: shared by every call)."""
    grid = np.linspace(0.0, 100.0 - BEYOND_HELD_OUT, n)
    grid.flags.writeable = False
    return grid


def percentiles(quantiles: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Where each score (n,) falls among the held-out scores, given as evenly spaced ``quantiles`` (k,); (n,) float32.

    Up to the largest held-out score m = quantiles[-1]: linear between the quantiles, scaled to 0 .. 99.9.
    Beyond it, where no held-out row says how rare a score is, a rank that stays below 100:
    100 - 0.1 / (1 + log10(s / m)), so 99.95 is ten times m, 99.967 a hundred times, 99.975 a thousand times.
    In float32 this keeps scores 0.5 % apart strictly ordered up to a million times m.
    """
    quantiles = np.asarray(quantiles, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    ranks = np.interp(scores, quantiles, _percentile_grid(len(quantiles)))
    beyond = scores > quantiles[-1]
    if beyond.any():  # the logarithm only where there are such rows: most calls have none
        largest = max(float(quantiles[-1]), np.finfo(np.float64).tiny)
        ranks[beyond] = 100.0 - BEYOND_HELD_OUT / (1.0 + np.log10(np.maximum(scores[beyond], largest) / largest))
    return ranks.astype(np.float32)


def compute(graphs: Graphs, anomaly: AnomalyScore, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The outputs ``call`` asks for, in its order, for ``rows`` (float32); each graph runs at most once. Scores and
    percentiles are ``anomaly``'s (models/anomaly.py)."""
    wanted = set(call.outputs)
    answer: dict[str, np.ndarray] = {}
    if call.takes == "codes":
        answer["reconstruction"] = graphs.from_model(graphs.decode(graphs.codes_in(rows)))
        return tuple(answer[name] for name in call.outputs)
    x = graphs.to_model(rows)
    code = graphs.encode(x)
    needs = anomaly.needs if wanted & {"score", "percentile"} else None  # what the score is computed from
    if "code" in wanted or needs in ("code", "feature_error"):
        answer["code"] = graphs.numpy(code)
    if wanted & {"reconstruction", "error", "feature_error"} or needs in ("error", "feature_error"):
        x_hat = graphs.decode(code)
        if "reconstruction" in wanted:
            answer["reconstruction"] = graphs.from_model(x_hat)
        if "feature_error" in wanted or needs == "feature_error":  # each value's error, and the row's as their sum
            answer["feature_error"] = graphs.numpy(graphs.squared_errors(x_hat, x))
            answer["error"] = answer["feature_error"].sum(axis=1)
        else:
            answer["error"] = graphs.numpy(graphs.squared_error(x_hat, x))
    if needs is not None:
        answer["score"] = anomaly.scores(answer.get("code"), answer.get("error"), answer.get("feature_error"))
        answer["percentile"] = percentiles(anomaly.quantiles, answer["score"])
    if "coordinates" in wanted:
        answer["coordinates"] = graphs.numpy(graphs.project(code))
    return tuple(answer[name] for name in call.outputs)


class NumpyGraphs:
    """``Graphs`` over numpy, for graphs that map float32 arrays to float32 arrays (ONNX Runtime sessions)."""

    def __init__(self, preprocessing: Any, run: Callable[[str, np.ndarray], np.ndarray]) -> None:
        self.preprocessing = preprocessing
        self._run = run

    def to_model(self, x: np.ndarray) -> np.ndarray:
        return self.preprocessing.to_model(x)

    def from_model(self, x: np.ndarray) -> np.ndarray:
        return self.preprocessing.from_model(x)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encode", x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._run("decode", z)

    def project(self, z: np.ndarray) -> np.ndarray:
        return self._run("project", z)

    @staticmethod
    def codes_in(z: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(z, dtype=np.float32)

    @staticmethod
    def numpy(t: np.ndarray) -> np.ndarray:
        return t

    @staticmethod
    def squared_error(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.square(x_hat - x).sum(axis=1)

    @staticmethod
    def squared_errors(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.square(x_hat - x)
