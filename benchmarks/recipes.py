"""Zero-config recipes: time and held-out error of `aeserve train --data FILE`, against closed-form PCA.

    .venv/bin/python -m benchmarks.recipes [--aeserve PATH] [--only NAME ...]

Each data set is written to a temporary folder (tables as CSV with a header, images as PNG files) and trained with
the public command, no config, into a temporary registry. For each: rows, columns (encoded features), wall-clock
seconds of the whole command (start-up, reading, training, metrics, report, publishing) and its CPU seconds (user
and system, all threads: less sensitive than the wall clock to other processes on a shared machine), the version's
test_sq_err and pca_sq_err (closed-form PCA with the same code size, same held-out rows), the published kind,
and the epochs run. `--aeserve` runs another install's command (the code before a change, say) on the same files.

Data: scikit-learn's breast cancer (569 x 30), wine (178 x 13) and digits as a table (1,797 x 64); synthetic
tables of 5,000 and 10,000 rows x 50 columns (8 latent factors through a random two-layer tanh map, plus noise:
structure that is not linear; 5,000 rows is the most that gets a cross-fit for its anomaly percentiles); the digits
as an array (1,797 x 8 x 8 .npy); a folder of 400 digit images (8 x 8 PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

ROOT = Path(__file__).resolve().parent.parent
AESERVE = str(Path(sys.executable).parent / "aeserve")


def write_table(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """x (n, d) floats, y (n,) labels or None -> a CSV with columns f0..f{d-1} (and `label`)."""
    header = [f"f{j}" for j in range(x.shape[1])] + (["label"] if y is not None else [])
    lines = [",".join(header)]
    for i, row in enumerate(x):
        lines.append(",".join([repr(float(v)) for v in row] + ([str(y[i])] if y is not None else [])))
    path.write_text("\n".join(lines) + "\n")
    return path


def synthetic(n: int = 10_000, d: int = 50, latent: int = 8, seed: int = 0) -> np.ndarray:
    """(n, d) rows on a curved 8-dimensional manifold with noise: z -> tanh(z A) B + 0.05 e."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, latent))
    hidden = np.tanh(z @ rng.normal(size=(latent, 32)) / np.sqrt(latent) * 2)
    return hidden @ rng.normal(size=(32, d)) / np.sqrt(32) + 0.05 * rng.normal(size=(n, d))


def npy(path: Path, x: np.ndarray) -> Path:
    np.save(path, x.astype(np.float32))
    return path


def digit_images(folder: Path, n: int = 400) -> Path:
    from PIL import Image

    bunch = load_digits()
    for i in range(n):
        sub = folder / str(bunch.target[i])
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((bunch.images[i] * 255 / 16).astype(np.uint8)).save(sub / f"{i}.png")
    return folder


# name -> (writes the data into a folder and returns its path, the --label column or None)
DATASETS: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "wine": (lambda tmp: write_table(tmp / "wine.csv", *load_wine(return_X_y=True)), "label"),
    "breast-cancer": (lambda tmp: write_table(tmp / "breast-cancer.csv", *load_breast_cancer(return_X_y=True)), "label"),
    "digits-table": (lambda tmp: write_table(tmp / "digits-table.csv", *load_digits(return_X_y=True)), "label"),
    "synthetic-5k": (lambda tmp: write_table(tmp / "synthetic-5k.csv", synthetic(5000)), None),
    "synthetic-10k": (lambda tmp: write_table(tmp / "synthetic-10k.csv", synthetic()), None),
    "digits-array": (lambda tmp: npy(tmp / "digits-array.npy", load_digits().images), None),
    "digit-images": (lambda tmp: digit_images(tmp / "digit-images"), None),
}


def run_one(aeserve: str, name: str, tmp: Path, seed: int) -> dict:
    make, label = DATASETS[name]
    path = make(tmp)
    registry = tmp / "registry"
    command = [aeserve, "train", "--data", str(path), "--registry", str(registry), "--quiet", "--seed", str(seed)]
    command += ["--label", label] if label else []
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    seconds, cpu_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    if done.returncode:
        raise SystemExit(f"{name}: {' '.join(command)} failed:\n{done.stderr}")
    manifest = json.loads((registry / path.stem / "1" / "manifest.json").read_text())
    training, metrics = manifest["training"], manifest["metrics"]
    return {
        "data": name, "rows": training["n_train"] + training["n_val"] + metrics["n_test"], "columns": int(np.prod(manifest["input_shape"])),
        "seconds": seconds, "cpu": cpu, "test_sq_err": metrics["test_sq_err"], "pca_sq_err": metrics["pca_sq_err"], "kind": manifest["kind"],
        "epochs": len(training.get("history", [])), "batch": training["run_config"]["train"]["batch_size"],
        "printed": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aeserve", default=AESERVE, help="the aeserve command to run (default: this environment's)")
    parser.add_argument("--only", nargs="*", choices=sorted(DATASETS), help="these data sets only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = []
    for name in args.only or DATASETS:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_one(args.aeserve, name, Path(tmp), args.seed))
        r = results[-1]
        print(f"{r['data']}: {r['seconds']:.1f} s, {r['kind']}, test {r['test_sq_err']:.4g}, PCA {r['pca_sq_err']:.4g}", file=sys.stderr)
    print("| data | rows | columns | seconds | CPU seconds | test_sq_err | pca_sq_err | ratio to PCA | kind | epochs run | batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['data']} | {r['rows']:,} | {r['columns']} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['test_sq_err']:.4g} | {r['pca_sq_err']:.4g} | "
              f"{r['test_sq_err'] / r['pca_sq_err']:.3g} | {r['kind']} | {r['epochs']} | {r['batch']} |")
    load = os.getloadavg()[0]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, load average {load:.2f} at the end; "
          f"command: `{args.aeserve} train --data FILE` via `.venv/bin/python -m benchmarks.recipes {' '.join(sys.argv[1:])}`")


if __name__ == "__main__":
    main()
