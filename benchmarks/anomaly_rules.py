"""Anomaly score rules side by side, in process, on versions trained as benchmarks/anomaly.py trains them.

    .venv/bin/python -m benchmarks.anomaly_rules [--seeds 0 1 2] [--classes 3]

The tasks and splits are benchmarks/anomaly.py's; each version is trained with ``aeserve train --data`` and no config
(``anomaly.cross_fit_rows=0`` and no report: neither changes the model). Every rule below is then computed from the
version's own codes and residuals, with its statistics fitted on the version's training rows (its data split as the
trainer splits it: no validation or test row), and scored by ROC-AUC against IsolationForest and kNN in the input fitted
on the same rows as benchmarks/anomaly.py fits them. No rule is tuned on the anomaly labels: each is a fixed formula;
this table is what chose ``combined`` as the default (docs/benchmarks.md, "Anomaly scores").

Rules (z: the code; r: the residual x - x_hat in model space; T2: Hotelling's, under the training codes' covariance):

- errors: sum r^2, the reconstruction error;
- neighbors: the mean distance to the 5 nearest training codes, standardized (the default before ``combined``);
- T2 alone, and the weighted residual alone: sum_j r_j^2 / v_j (v_j: the training rows' mean square of r_j);
- combined: (T2 / code_dim + weighted residual / input_dim) / 2 (models/anomaly.py);
- combined, likelihood weights: T2 + weighted residual (a Gaussian's negative log-likelihood, the terms unscaled);
- PPCA-style: errors / their training mean + T2 / code_dim (the residual unweighted);
- neighbours + residual: the squared neighbour distance over its training mean, plus the weighted residual / input_dim.

Prints one Markdown table: ROC-AUC per data set (the mean over its seeds and normal classes) and the mean of the four.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from aeserve.models.anomaly import Combined, Neighbors
from aeserve.models.outputs import Call
from aeserve.models.registry import Registry
from aeserve.training.recipes import recipe_run_config
from aeserve.training.trainer import split_validation
from benchmarks.anomaly import AESERVE, ROOT, Task, baselines, tasks, write_data

PARTS = Call("inputs", ("code", "error", "feature_error"))
QUICK = ["--quiet", "--set", "anomaly.cross_fit_rows=0", "--set", "train.report=false"]
Parts = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes (n, code_dim), errors (n,), squared errors per feature (n, input_dim)


def train(task: Task, folder: Path, registry: Path, seed: int) -> tuple[Parts, Parts, float]:
    """Train ``task`` as benchmarks/anomaly.py does; (its training rows' parts, its score rows' parts, the mean
    variance of its training rows' features in model space)."""
    path, extra = write_data(task, folder)
    subprocess.run([AESERVE, "train", "--data", str(path), *extra, "--name", task.name, "--registry", str(registry), "--seed", str(seed),
                    *QUICK], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    version = Registry(registry).load(task.name)
    config, dataset = recipe_run_config(str(path), task.label, name=task.name, seed=seed)
    train_index, _ = split_validation(len(dataset.train_x), config.data.val_fraction, config.train.seed)
    training_rows = dataset.train_x[train_index.numpy()]
    variance = float(version.preprocessing.to_model(training_rows).var(axis=0).mean())
    return version.run(PARTS, training_rows), version.run(PARTS, task.score_x.astype(np.float32)), variance


def rules(fit: Parts, score: Parts, input_variance: float) -> dict[str, np.ndarray]:
    """Each rule's scores of the score rows, its statistics fitted on the training rows' parts."""
    (codes, errors, feature_errors), (z, e, fe) = fit, score
    combined = Combined.fit(codes, feature_errors.mean(axis=0), input_variance)
    t2, residual = combined.terms(z, fe)
    neighbors = Neighbors.fit(codes, k=5, reference_rows=len(codes), seed=0)
    neighbour, neighbour_fit = neighbors.scores(z), neighbors_without_self(neighbors, codes)
    return {
        "errors": e,
        "neighbors": neighbour,
        "T2 alone": t2,
        "weighted residual alone": residual,
        "**combined**": combined.scores(z, fe),
        "combined, likelihood weights": t2 * len(combined.code_mean) + residual * len(combined.residual_weight),
        "PPCA-style: errors + T2": e / errors.mean() + t2,
        "neighbours^2 + weighted residual": neighbour ** 2 / np.mean(neighbour_fit ** 2) + residual,
    }


def neighbors_without_self(neighbors: Neighbors, codes: np.ndarray) -> np.ndarray:
    """Each training code's neighbour score among the other training codes (its own distance, 0, left out)."""
    k = neighbors.k
    wider = Neighbors(neighbors.reference, neighbors.mean, neighbors.scale, min(k + 1, len(neighbors.reference)))
    return wider.scores(codes) * wider.k / max(wider.k - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed-{seed}"
            folder.mkdir()
            for task in tasks(seed, args.classes):
                fit, score, variance = train(task, folder, folder / "registry", seed)
                row = {name: roc_auc_score(task.score_y, values) for name, values in rules(fit, score, variance).items()}
                row.update({name: auc for name, auc in baselines(task, seed, None).items() if name in ("IsolationForest", "kNN")})
                results.setdefault(task.dataset, []).append(row)
                print(json.dumps({"seed": seed, "task": task.name, **{k: round(v, 4) for k, v in row.items()}}), file=sys.stderr)
    datasets = list(results)
    names = list(results[datasets[0]][0])
    print(f"\n{sum(len(v) for v in results.values())} versions: seeds {args.seeds}, {args.classes} normal class(es) of wine, digits and "
          f"Fashion-MNIST each; ROC-AUC, each data set's mean over its versions\n")
    print("| rule | " + " | ".join(datasets) + " | mean of the 4 |\n|---|" + "---|" * (len(datasets) + 1))
    for name in names:
        means = [float(np.mean([row[name] for row in results[d]])) for d in datasets]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {np.mean(means):.3f} |")
    print(f"\nthe whole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
