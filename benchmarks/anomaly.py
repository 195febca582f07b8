"""Anomaly scores on four public one-class tasks, scored through the HTTP API against five baselines in the same run.

    .venv/bin/python -m benchmarks.anomaly [--classes N] [--seed S]

Each task trains on normal rows only and scores held-out normal rows (negatives) and anomalous rows (positives):

- breast cancer (scikit-learn): benign normal, malignant anomalous. A seeded 70 % of the 357 benign rows train; the
  other 107 and all 212 malignant rows are scored. Written as a CSV with a ``diagnosis`` column (``--label``).
- wine (scikit-learn, 178 rows, 13 features, cultivars of 59 / 71 / 48 rows): one cultivar normal, the other two
  anomalous; the same 70 / 30 split of the normal rows. A CSV with a ``cultivar`` column (``--label``).
- digits (scikit-learn, 1,797 8x8 images, about 180 per digit): one digit normal, the other nine anomalous; the same
  70 / 30 split. An .npy array (n, 8, 8), pixels 0-16.
- Fashion-MNIST (the IDX files in /usr/share/datasets/fashion-mnist): one class normal. 2,000 images of it drawn
  (seeded) from the training split train; its 1,000 test-split images and 1,000 drawn from the other nine classes'
  test images are scored. An .npy array (n, 28, 28), pixels 0-255.

``--classes N`` makes each of the first N classes of wine, digits and Fashion-MNIST the normal one in turn and reports
each data set's mean ROC-AUC over them. The default, 3 (cultivars 0-2, digits 0-2, T-shirt/top, trouser, pullover:
ten versions with breast cancer), so that no data set's figure rests on one normal class; N = 1 takes cultivar 0,
digit 0 and T-shirt/top alone.

aeserve: ``aeserve train --data FILE`` with no config into a temporary registry, then one ``aeserve serve`` on
loopback; every task's rows go through ``reconstruct`` with the Python client. aeserve's score is ``scores`` where the
answer carries it, else ``errors`` (the table says which); ``errors`` is shown beside it either way.

Baselines (scikit-learn, pyod), fitted on the same training rows, all on features standardized with the training rows'
mean and standard deviation (per pixel for images): IsolationForest (200 trees), LocalOutlierFactor (novelty, 20
neighbours), PCA residual Q (the squared distance to the subspace of the fewest components that explain 90 % of the
training variance), kNN (mean distance to the 5 nearest training rows), and pyod's AutoEncoder at its defaults
(skipped, and said so, when pyod is not installed). Prints Markdown tables, the floors the score is held to and the machine.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
from sklearn.preprocessing import StandardScaler

from aeserve.training.data.builtin import load_fashion_mnist
from aeserve.training.data.config import DataConfig
from aeserve_client import Client
from benchmarks.loadgen import served

ROOT = Path(__file__).resolve().parent.parent
AESERVE = str(Path(sys.executable).parent / "aeserve")
HOLDOUT = 0.3  # the share of a scikit-learn table's normal rows held out for scoring
FMNIST_TRAIN, FMNIST_NORMAL_SCORED, FMNIST_ANOMALIES_SCORED = 2000, 1000, 1000
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PCA_VARIANCE = 0.90
KNN_K = 5
FLOOR_BREAST_CANCER = 0.955


@dataclass
class Task:
    """One one-class task: a model trains on ``train_x`` (normal rows only) and scores ``score_x``.

    train_x (n_train, *row_shape) and score_x (n_score, *row_shape) float64; score_y (n_score,) int, 1 = anomalous.
    ``columns`` names a table's features (written as a CSV with a label column); None writes an .npy array.
    """

    name: str  # the registry name, e.g. "digits-0"
    dataset: str
    normal: str
    anomalous: str
    train_x: np.ndarray
    score_x: np.ndarray
    score_y: np.ndarray
    columns: list[str] | None = None
    label: str | None = None


def one_class_split(x: np.ndarray, normal: np.ndarray, seed: int, holdout: float = HOLDOUT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train on a seeded (1 - holdout) of the ``normal`` rows; score the rest of them and every other row.

    x (n, ...), normal (n,) bool -> train_x, score_x (held-out normal rows first, then the anomalies), score_y (1 = anomalous).
    """
    order = np.random.default_rng(seed).permutation(np.flatnonzero(normal))
    n_held = int(round(len(order) * holdout))
    held, fit = np.sort(order[:n_held]), np.sort(order[n_held:])
    score = np.concatenate([held, np.flatnonzero(~normal)])
    return x[fit], x[score], (~normal[score]).astype(int)


def breast_cancer(seed: int) -> Task:
    bunch = load_breast_cancer()
    train_x, score_x, score_y = one_class_split(bunch.data, bunch.target == 1, seed)  # target 1 = benign
    return Task("breast-cancer", "breast cancer", "benign", "malignant", train_x, score_x, score_y, list(bunch.feature_names), "diagnosis")


def wine(seed: int, cultivar: int) -> Task:
    bunch = load_wine()
    train_x, score_x, score_y = one_class_split(bunch.data, bunch.target == cultivar, seed)
    return Task(f"wine-{cultivar}", "wine", f"cultivar {cultivar}", "the other two cultivars", train_x, score_x, score_y,
                list(bunch.feature_names), "cultivar")


def digits(seed: int, digit: int) -> Task:
    bunch = load_digits()
    train_x, score_x, score_y = one_class_split(bunch.images, bunch.target == digit, seed)
    return Task(f"digits-{digit}", "digits", f"digit {digit}", "the other nine digits", train_x, score_x, score_y)


def fashion_mnist(seed: int, normal_class: int) -> Task:
    data = load_fashion_mnist(DataConfig(source="fashion-mnist"))
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(np.flatnonzero(data.train_y == normal_class), FMNIST_TRAIN, replace=False))
    test_y = data.test_y
    held = np.sort(rng.choice(np.flatnonzero(test_y == normal_class), FMNIST_NORMAL_SCORED, replace=False))
    others = np.sort(rng.choice(np.flatnonzero(test_y != normal_class), FMNIST_ANOMALIES_SCORED, replace=False))
    score = np.concatenate([held, others])
    return Task(f"fashion-mnist-{normal_class}", "Fashion-MNIST", FMNIST_CLASSES[normal_class], "the other nine classes",
                data.train_x[fit].astype(np.float64), data.test_x[score].astype(np.float64),
                (test_y[score] != normal_class).astype(int))


def tasks(seed: int, classes: int) -> list[Task]:
    """Breast cancer, then each of the first ``classes`` classes of wine, digits and Fashion-MNIST as the normal one."""
    made = [breast_cancer(seed)]
    for builder, n_classes in ((wine, 3), (digits, 10), (fashion_mnist, 10)):
        made += [builder(seed, c) for c in range(min(classes, n_classes))]
    return made


def write_data(task: Task, folder: Path) -> tuple[Path, list[str]]:
    """The training file as a new user would have it, and the ``aeserve train`` arguments that name it."""
    if task.columns is None:
        path = folder / f"{task.name}.npy"
        np.save(path, task.train_x.astype(np.float32))
        return path, []
    path = folder / f"{task.name}.csv"
    lines = [",".join([f'"{c}"' for c in task.columns] + [task.label])]
    lines += [",".join([repr(float(v)) for v in row] + [task.normal.replace(" ", "-")]) for row in task.train_x]
    path.write_text("\n".join(lines) + "\n")
    return path, ["--label", task.label]


# --- baselines -------------------------------------------------------------------


def pca_residual(train: np.ndarray, score: np.ndarray, seed: int) -> np.ndarray:
    """Q: squared distance of each score row to the span of the fewest components explaining PCA_VARIANCE of train."""
    pca = PCA(n_components=PCA_VARIANCE, svd_solver="full", random_state=seed).fit(train)
    return ((score - pca.inverse_transform(pca.transform(score))) ** 2).sum(axis=1)


def knn_distance(train: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance of each score row to its KNN_K nearest training rows."""
    distances, _ = NearestNeighbors(n_neighbors=KNN_K).fit(train).kneighbors(score)
    return distances.mean(axis=1)


def pyod_autoencoder() -> Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None:
    """pyod's AutoEncoder at its defaults (on CPU, quiet), or None when pyod is not installed."""
    try:
        from pyod.models.auto_encoder import AutoEncoder
    except ImportError:
        return None

    def scores(train: np.ndarray, score: np.ndarray, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        return AutoEncoder(random_state=seed, device="cpu", verbose=0).fit(train).decision_function(score)
    return scores


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "IsolationForest": lambda train, score, seed: -IsolationForest(n_estimators=200, random_state=seed).fit(train).score_samples(score),
    "LOF": lambda train, score, seed: -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(train).score_samples(score),
    "PCA Q": pca_residual,
    "kNN": lambda train, score, seed: knn_distance(train, score),
}


def baselines(task: Task, seed: int, autoencoder: Callable | None) -> dict[str, float]:
    """ROC-AUC of each baseline on ``task``, every one fitted on the standardized training rows."""
    train, score = task.train_x.reshape(len(task.train_x), -1), task.score_x.reshape(len(task.score_x), -1)
    scaler = StandardScaler().fit(train)
    train, score = scaler.transform(train), scaler.transform(score)
    methods = dict(BASELINES, **({"pyod AutoEncoder": autoencoder} if autoencoder else {}))
    return {name: roc_auc_score(task.score_y, method(train, score, seed)) for name, method in methods.items()}


# --- aeserve ---------------------------------------------------------------------


def train(task: Task, folder: Path, registry: Path, seed: int) -> tuple[dict, float]:
    """``aeserve train --data FILE`` with no config; the published manifest and the training's wall seconds."""
    path, extra = write_data(task, folder)
    command = [AESERVE, "train", "--data", str(path), *extra, "--name", task.name, "--registry", str(registry), "--quiet", "--seed", str(seed)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return json.loads((registry / task.name / "1" / "manifest.json").read_text()), seconds


def served_scores(client: Client, task: Task) -> dict[str, np.ndarray]:
    """``reconstruct`` over HTTP on the task's score rows: ``errors``, and ``scores`` where the answer has them."""
    result = client.reconstruct(task.name, task.score_x.astype(np.float32))
    answers = {"errors": np.asarray(result.errors)}
    if getattr(result, "scores", None) is not None:
        answers["scores"] = np.asarray(result.scores)
    return answers


# --- the report --------------------------------------------------------------------


@dataclass
class Measured:
    task: Task
    aeserve: dict[str, float]  # ROC-AUC of each field the answer carried
    baselines: dict[str, float]
    manifest: dict
    train_seconds: float


def by_dataset(measured: list[Measured], field: str, methods: list[str]) -> dict[str, dict[str, float]]:
    """Each data set's ROC-AUC per column (aeserve's field, ``errors``, each baseline), averaged over its normal classes."""
    columns: dict[str, dict[str, list[float]]] = {}
    for m in measured:
        values = {"aeserve": m.aeserve[field], "errors": m.aeserve["errors"], **m.baselines}
        for column in ["aeserve", "errors", *methods]:
            columns.setdefault(m.task.dataset, {}).setdefault(column, []).append(values[column])
    return {dataset: {column: float(np.mean(v)) for column, v in cols.items()} for dataset, cols in columns.items()}


def sizes(tasks_of_a_dataset: list[Task], size: Callable[[Task], int]) -> str:
    """One size of a data set's tasks: one number, or each distinct one (classes differ in size) joined by '/'."""
    return "/".join(str(n) for n in sorted({size(t) for t in tasks_of_a_dataset}))


def table(measured: list[Measured], field: str, methods: list[str]) -> tuple[str, dict[str, float], dict[str, dict[str, float]]]:
    """The Markdown table of ROC-AUC per data set and its mean row; also the means and per-data-set figures."""
    datasets = by_dataset(measured, field, methods)
    columns = ["aeserve", "errors", *methods]
    means = {c: float(np.mean([d[c] for d in datasets.values()])) for c in columns}
    header = ["data set", "normal (trained on)", "train rows", "scored: normal + anomalous", f"aeserve score: `{field}`", "aeserve `errors`", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset, figures in datasets.items():
        mine = [m.task for m in measured if m.task.dataset == dataset]
        normal = ", ".join(t.normal for t in mine)
        best = max(figures.values())
        cells = [f"**{figures[c]:.3f}**" if figures[c] == best else f"{figures[c]:.3f}" for c in columns]
        lines.append(f"| {dataset} | {normal} | {sizes(mine, lambda t: len(t.train_x))} | {sizes(mine, lambda t: int((t.score_y == 0).sum()))} + "
                     f"{sizes(mine, lambda t: int(t.score_y.sum()))} | " + " | ".join(cells) + " |")
    best = max(means.values())
    cells = [f"**{means[c]:.3f}**" if means[c] == best else f"{means[c]:.3f}" for c in columns]
    lines.append(f"| **mean of the {len(datasets)} data sets** | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines), means, datasets


def floors(field: str, means: dict[str, float], datasets: dict[str, dict[str, float]]) -> list[str]:
    """The floors the score is held to (IsolationForest on the mean, 0.955 on breast cancer), each with whether it holds."""
    verdict = {True: "holds", False: "FAILS"}
    mean, forest = means["aeserve"], means["IsolationForest"]
    cancer = datasets["breast cancer"]["aeserve"]
    return [f"floor: aeserve `{field}` mean ROC-AUC {mean:.4f} >= IsolationForest's {forest:.4f}: {verdict[mean >= forest]}",
            f"floor: aeserve `{field}` ROC-AUC on breast cancer {cancer:.4f} >= {FLOOR_BREAST_CANCER}: {verdict[cancer >= FLOOR_BREAST_CANCER]}"]


def trained_line(m: Measured) -> str:
    """One published version: its kind and widths, epochs, errors, training seconds and what its percentiles rest on."""
    metrics, training, manifest = m.manifest["metrics"], m.manifest["training"], m.manifest
    config = manifest["config"]
    shape = "-".join(str(v) for v in [int(np.prod(m.task.train_x.shape[1:])), *config.get("hidden", []), manifest["code_dim"]])
    anomaly = manifest.get("anomaly", {})
    cross_fit = anomaly.get("cross_fit")
    folds = "closed-form PCA" if manifest["kind"] == "pca" else f"{cross_fit['fold_epochs']} epochs against {cross_fit['published_epochs']}" \
        if cross_fit else ""
    rest_on = anomaly.get("held_out", "?") + (f" (fold models {folds}, scale {cross_fit['scale']:.3g})" if cross_fit else "")
    return (f"| {m.task.name} | {manifest['kind']} {shape} | {len(training['history'])} / {training.get('best_epoch')} | "
            f"{metrics['test_sq_err']:.4g} / {metrics['pca_sq_err']:.4g} | {m.train_seconds:.1f} | {anomaly.get('score', '(none)')} | {rest_on} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=3, help="how many classes of wine, digits and Fashion-MNIST take a turn as the normal one")
    parser.add_argument("--seed", type=int, default=0, help="the splits', the baselines' and the training's seed")
    args = parser.parse_args()

    started = time.perf_counter()
    autoencoder = pyod_autoencoder()
    methods = [*BASELINES, *(["pyod AutoEncoder"] if autoencoder else [])]
    work = tasks(args.seed, args.classes)
    measured: list[Measured] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, registry = Path(tmp), Path(tmp) / "registry"
        trained = [train(task, folder, registry, args.seed) for task in work]
        with served(registry) as base, Client(base, timeout=120) as client:
            answers = [served_scores(client, task) for task in work]
    for task, (manifest, seconds), answer in zip(work, trained, answers, strict=True):
        aeserve = {field: roc_auc_score(task.score_y, values) for field, values in answer.items()}
        measured.append(Measured(task, aeserve, baselines(task, args.seed, autoencoder), manifest, seconds))
    field = "scores" if all("scores" in m.aeserve for m in measured) else "errors"

    text, means, datasets = table(measured, field, methods)
    print(f"\nROC-AUC, anomalous = positive; aeserve's score is `{field}`"
          + ("" if field == "scores" else " (the answers carry no `scores`)") + "; bold: the best in its row\n")
    print(text)
    print()
    print("\n".join(floors(field, means, datasets)))
    if autoencoder is None:
        print("pyod is not installed: its AutoEncoder was skipped (pip install pyod)")
    print("\n| version | published | epochs run / kept | test_sq_err / pca_sq_err | training (s) | `anomaly.score` | percentiles rest on |\n"
          "|---|---|---|---|---|---|---|")
    print("\n".join(trained_line(m) for m in measured))

    shown = " ".join(["python -m benchmarks.anomaly", *sys.argv[1:]])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    pyod_version = f", pyod {__import__('pyod').__version__}" if autoencoder else ""
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
          f"scikit-learn {__import__('sklearn').__version__}{pyod_version}; the whole run {time.perf_counter() - started:.0f} s")
    print(f"command: `.venv/bin/{shown}`")


if __name__ == "__main__":
    main()
