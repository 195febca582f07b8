"""Anomaly scores: benign rows in, malignant rows out, scored through the HTTP API against scikit-learn baselines.

    .venv/bin/python -m benchmarks.anomaly

scikit-learn's breast-cancer table (569 rows, 30 features, 357 benign, 212 malignant) is written as a CSV with a
header and a `diagnosis` column. A seeded part of the benign rows is held out; the rest go to `benign.csv`, and
`aeserve train --data benign.csv --label diagnosis` (no config: the table recipe) trains on them into a temporary
registry. `aeserve serve` then scores the held-out benign rows and every malignant row through `reconstruct` (object
rows keyed by column name), and the ROC-AUC of `errors` and of `percentiles` (malignant = positive) is reported
beside IsolationForest, standardized PCA reconstruction error and LocalOutlierFactor (novelty=True), all fitted on
the same benign training rows. Prints one markdown table with the machine and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from sklearn.preprocessing import StandardScaler

from benchmarks.loadgen import served

ROOT = Path(__file__).resolve().parent.parent
AESERVE = str(Path(sys.executable).parent / "aeserve")
PCA_CODES = (2, 4, 6, 8, 10, 12)


def write_csv(path: Path, names: list[str], x: np.ndarray, diagnosis: list[str]) -> None:
    lines = [",".join(['"' + n + '"' for n in names] + ["diagnosis"])]
    lines += [",".join([repr(float(v)) for v in row] + [d]) for row, d in zip(x, diagnosis, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def baselines(x_train: np.ndarray, x_score: np.ndarray, y_score: np.ndarray, seed: int) -> list[tuple[str, float]]:
    """ROC-AUC of each scikit-learn baseline fitted on the benign training rows ``x_train`` (n, 30)."""
    scaler = StandardScaler().fit(x_train)
    train, score = scaler.transform(x_train), scaler.transform(x_score)
    rows = [("IsolationForest (200 trees)", roc_auc_score(y_score, -IsolationForest(n_estimators=200, random_state=seed).fit(train).score_samples(score)))]
    pca, fits = {}, {}
    for k in PCA_CODES:
        fits[k] = fitted = PCA(n_components=k, random_state=seed).fit(train)
        errors = ((score - fitted.inverse_transform(fitted.transform(score))) ** 2).sum(axis=1)
        pca[k] = roc_auc_score(y_score, errors)
    best = max(pca, key=pca.get)
    rows += [("PCA(4) reconstruction error, standardized", pca[4]),
             (f"PCA best k of {list(PCA_CODES)} (k={best}, chosen on the anomaly labels)", pca[best])]
    lof = LocalOutlierFactor(n_neighbors=20, novelty=True).fit(train)
    rows.append(("LocalOutlierFactor (novelty, 20 neighbours)", roc_auc_score(y_score, -lof.score_samples(score))))
    # Two reconstruction-error detectors that cannot extrapolate along the benign rows' main directions, shown to
    # explain the gap, not as baselines: PCA(4) with its codes clipped to the range the training rows reach, and no
    # code at all (k = 0: every row reconstructed as the benign mean, so the error is the squared standardized norm).
    codes = fits[4].transform(train)
    clipped = fits[4].inverse_transform(np.clip(fits[4].transform(score), codes.min(axis=0), codes.max(axis=0)))
    rows += [("PCA(4), codes clipped to the training range (explanatory)", roc_auc_score(y_score, ((score - clipped) ** 2).sum(axis=1))),
             ("distance to the benign mean, k = 0 (explanatory)", roc_auc_score(y_score, (score**2).sum(axis=1)))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--holdout", type=float, default=0.3, help="fraction of the benign rows held out for scoring")
    parser.add_argument("--seed", type=int, default=0, help="the benign hold-out split, the baselines' and the training's seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to aeserve train (tries of the recipe)")
    parser.add_argument("--rows", choices=["objects", "arrays"], default="objects", help="how the rows are sent to reconstruct")
    args = parser.parse_args()

    bunch = load_breast_cancer()
    names, x, malignant = list(bunch.feature_names), bunch.data, bunch.target == 0
    benign_rows = np.flatnonzero(~malignant)
    order = np.random.default_rng(args.seed).permutation(benign_rows)
    n_held = int(round(len(order) * args.holdout))
    held, fit_rows = np.sort(order[:n_held]), np.sort(order[n_held:])
    score_rows = np.concatenate([held, np.flatnonzero(malignant)])
    y_score = malignant[score_rows].astype(int)

    with tempfile.TemporaryDirectory() as tmp:
        csv, registry = Path(tmp) / "benign.csv", Path(tmp) / "registry"
        write_csv(csv, names, x[fit_rows], ["benign"] * len(fit_rows))
        command = [AESERVE, "train", "--data", str(csv), "--label", "diagnosis", "--registry", str(registry), "--quiet",
                   "--seed", str(args.seed), *[f"--set={o}" for o in args.overrides]]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        train_seconds = time.perf_counter() - started
        manifest = json.loads((registry / "benign" / "1" / "manifest.json").read_text())

        with served(registry) as base:
            rows = x[score_rows]
            inputs = [dict(zip(names, map(float, row), strict=True)) for row in rows] if args.rows == "objects" else rows.tolist()
            answer = httpx.post(f"{base}/v1/models/benign/reconstruct", json={"inputs": inputs}, timeout=60)
            answer.raise_for_status()
            body = answer.json()

    errors, percentiles = np.asarray(body["errors"]), np.asarray(body["percentiles"])
    training, metrics = manifest["training"], manifest["metrics"]
    run_model = training["run_config"]["model"]
    history = training["history"]
    best_val = min(r["val_sq_err"] for r in history)
    results = [("aeserve `errors` (HTTP reconstruct)", roc_auc_score(y_score, errors)),
               ("aeserve `percentiles` (HTTP reconstruct)", roc_auc_score(y_score, percentiles))]
    results += baselines(x[fit_rows], x[score_rows], y_score, args.seed)

    shown = " ".join(["python -m benchmarks.anomaly", *sys.argv[1:]])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"\nbreast cancer: {len(fit_rows)} benign training rows (aeserve holds out its own validation and test rows among them), "
          f"scored: {len(held)} held-out benign + {int(malignant.sum())} malignant rows, sent as {args.rows}\n")
    print("| method | ROC-AUC |\n|---|---|")
    for label, auc in results:
        print(f"| {label} | {auc:.4f} |")
    run_train = {k: training["run_config"]["train"][k] for k in ("epochs", "patience", "batch_size", "lr", "weight_decay")}
    print(f"\naeserve recipe: model {json.dumps(run_model)}, train {json.dumps(run_train)}")
    print(f"  epochs run {len(history)}, best epoch {training.get('best_epoch')}, best val_sq_err {best_val:.4f} ({training['n_val']} rows), "
          f"test_sq_err {metrics['test_sq_err']:.4f} (PCA {metrics['pca_sq_err']:.4f}), percentile rows {metrics.get('error_quantiles_rows')}, "
          f"training {train_seconds:.1f} s")
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
          f"scikit-learn {__import__('sklearn').__version__}")
    print(f"command: `.venv/bin/{shown}`")


if __name__ == "__main__":
    main()
