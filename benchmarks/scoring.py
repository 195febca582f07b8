"""What an anomaly score costs beside the model call it follows, at 1 and 10,000 rows.

For each version, on torch as the server's torch engine runs it (one thread under 64 rows, every core in blocks of
1,024 above), each the best of several repeats:

- the model call: ``reconstruct`` without a score (reconstruction and error);
- ``reconstruct`` with ``score`` and ``percentile``, the version scoring by each score in turn: ``combined`` (its
  state fitted on the version's own codes and residuals), ``neighbors`` (a reference set of 2,000 codes, k = 5, the
  earlier default) and ``error``;
- each score alone (models/anomaly.py and the percentiles, on the call's codes, errors and squared errors per feature).

Without ``--registry`` it trains its versions into a temporary registry first (about a minute): breast cancer and the
digits array with ``train --data`` (small table models: the recipe's MLP, or closed-form PCA where it is better), and
the 784-1000-500-250-30 MLP of configs/fmnist-mlp30.toml for one epoch (epochs do not change a graph's cost). Calls
take turns within each round of repeats (the neighbour score in rounds of its own, after the others), and each figure
is the best of its rounds (2,000 at 1 row, 15 at 10,000).

    .venv/bin/python -m benchmarks.scoring [--registry DIR --model NAME ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from aeserve.models.anomaly import AnomalyScore, Combined, Neighbors
from aeserve.models.outputs import Call, percentiles
from aeserve.models.registry import Registry
from aeserve.models.version import ModelVersion
from aeserve.service.runtime.torch_engine import TorchEngine
from benchmarks.recipes import npy, write_table

ROOT = Path(__file__).resolve().parent.parent
AESERVE = str(Path(sys.executable).parent / "aeserve")
MODEL_CALL = Call("inputs", ("reconstruction", "error"))
SCORED_CALL = Call("inputs", ("reconstruction", "error", "score", "percentile"))
PARTS = Call("inputs", ("code", "error", "feature_error"))
ROWS = (1, 10_000)
REFERENCE_ROWS = 2000
QUICK = ["--quiet", "--set", "anomaly.cross_fit_rows=0", "--set", "train.report=false"]


def best_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each call's best time over ``repeats`` rounds, the calls taking turns within a round, so that a burst of other
    work on a shared machine slows every call of a round rather than one call's every repeat."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def train_versions(folder: Path) -> tuple[Registry, list[str]]:
    """The three versions of the module docstring, trained into ``folder``/registry."""
    registry = folder / "registry"
    cancer = load_breast_cancer()
    table = write_table(folder / "breast-cancer.csv", cancer.data, cancer.target)
    runs = [["--data", str(table), "--label", "label", "--name", "breast-cancer"],
            ["--data", str(npy(folder / "digits.npy", load_digits().images)), "--name", "digits"],
            [str(ROOT / "configs" / "fmnist-mlp30.toml"), "--set", "train.epochs=1"]]
    for run in runs:
        subprocess.run([AESERVE, "train", *run, "--registry", str(registry), *QUICK], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return Registry(registry), ["breast-cancer", "digits", "fmnist-mlp30"]


def scored_by(version: ModelVersion, x: np.ndarray) -> dict[str, ModelVersion]:
    """The version scoring by each score, fitted on its own rows ``x`` (raw, (n, *input_shape))."""
    codes, _, feature_errors = version.run(PARTS, x)
    model_rows = version.preprocessing.to_model(x)
    combined = Combined.fit(codes, feature_errors.mean(axis=0), float(model_rows.var(axis=0).mean()))
    neighbors = Neighbors.fit(np.resize(codes, (REFERENCE_ROWS, version.code_dim)), k=5, reference_rows=REFERENCE_ROWS, seed=0)
    quantiles = np.linspace(0.0, 1.0, 101)
    return {name: dataclasses.replace(version, anomaly=AnomalyScore(quantiles, method))
            for name, method in (("combined", combined), ("neighbors", neighbors), ("error", None))}


def score_alone(anomaly: AnomalyScore, codes: np.ndarray, errors: np.ndarray, feature_errors: np.ndarray) -> np.ndarray:
    """The score and its percentiles from a call's codes, errors and squared errors per feature, as compute() makes them."""
    return percentiles(anomaly.quantiles, anomaly.scores(codes, errors, feature_errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", help="versions already trained (default: train the three of the docstring)")
    parser.add_argument("--model", nargs="+", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry, names = (Registry(args.registry), args.model) if args.registry else train_versions(Path(tmp))
        engine, rng = TorchEngine(), np.random.default_rng(0)
        scores = ("combined", "neighbors", "error")
        print("| model | rows | model call (ms) | " + " | ".join(f"with `{s}` (ms)" for s in scores) + " | "
              + " | ".join(f"`{s}` alone (ms)" for s in scores) + " |")
        print("|---|---|---|" + "---|" * 2 * len(scores))
        for name in names:
            version = registry.load(name)
            pre = version.preprocessing
            x = (pre.offset + rng.random((max(ROWS), pre.input_dim)) / pre.scale).astype(np.float32)  # the training data's range
            variants = scored_by(version, x)
            for n in ROWS:
                rows = x[:n]
                codes, errors, feature_errors = version.run(PARTS, rows)
                repeats, best = 2000 if n == 1 else 15, {}
                # The neighbour search in rounds of its own, after the others: its big products leave BLAS threads
                # spinning on both cores, which slowed whatever call came next.
                for group in (("combined", "error"), ("neighbors",)):
                    calls = {"model": functools.partial(engine.run, version, MODEL_CALL, rows)} if not best else {}
                    for s in group:
                        calls[s] = functools.partial(engine.run, variants[s], SCORED_CALL, rows)
                        calls[f"{s} alone"] = functools.partial(score_alone, variants[s].anomaly, codes, errors, feature_errors)
                    best.update(best_seconds(calls, repeats))
                print(f"| {name} ({version.manifest['kind']} {pre.input_dim}-{version.code_dim}) | {n:,} | {best['model'] * 1e3:.3f} | "
                      + " | ".join(f"{best[s] * 1e3:.3f}" for s in scores) + " | "
                      + " | ".join(f"{best[f'{s} alone'] * 1e3:.3f}" for s in scores) + " |")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
