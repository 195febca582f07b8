"""Whether percentiles hold on rows no model saw, and what the cross-fit costs, for each way of obtaining them.

    .venv/bin/python -m benchmarks.percentiles [--seeds 0 1 2] [--settings default anomaly.cross_fit_steps=0 ...]

Each table (scikit-learn's breast cancer, 569 x 30; wine, 178 x 13; digits as a table, 1,797 x 64; a synthetic table of
4,000 x 50, benchmarks/recipes.py's) is split seeded: a third of its rows are kept aside as fresh rows, the rest are
written as a CSV and trained with ``aeserve train --data`` and no config but one ``--set`` per setting. The fresh rows,
normal rows that neither the version nor any fold model trained on, then get the version's percentiles: were they
honest, a tenth of the rows would fall above 90, a twentieth above 95 and a hundredth above 99, and their mean would be
50. Settings (``--set`` keys; "default" is none): ``anomaly.cross_fit_steps=0`` (fold models as long as the version,
the cross-fit before its cost was bounded), the default (half the version's steps shared by the fold models),
``anomaly.cross_fit_steps=1``, and ``anomaly.cross_fit_rows=0`` (no cross-fit: the validation and test rows alone).

Prints one Markdown table: per table and setting, over the seeds, the rows above 90 / 95 / 99 (shares of all fresh rows
of all seeds), the mean percentile, the published kinds and the training's seconds and CPU seconds (mean over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

from aeserve.models.registry import Registry
from benchmarks.recipes import AESERVE, ROOT, synthetic, write_table

SETTINGS = ("anomaly.cross_fit_steps=0", "default", "anomaly.cross_fit_steps=1", "anomaly.cross_fit_rows=0")
FRESH = 1 / 3  # the share of a table's rows kept aside


def tables() -> dict[str, np.ndarray]:
    return {"breast cancer": load_breast_cancer().data, "wine": load_wine().data, "digits table": load_digits().data,
            "synthetic 4,000 x 50": synthetic(4000, 50)}


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, x: np.ndarray, seed: int, setting: str, folder: Path) -> dict:
    """Train on the seeded two thirds of ``x`` with ``setting``; the fresh third's percentiles and the training's cost."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_fresh = int(len(x) * FRESH)
    path = write_table(folder / f"{name.split()[0]}-{seed}.csv", x[order[n_fresh:]])
    registry = folder / f"registry-{seed}-{SETTINGS.index(setting) if setting in SETTINGS else setting}"
    command = [AESERVE, "train", "--data", str(path), "--name", "t", "--registry", str(registry), "--quiet", "--seed", str(seed),
               "--set", "train.report=false", *([] if setting == "default" else ["--set", setting])]
    started, cpu = time.perf_counter(), child_cpu_seconds()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu
    version = Registry(registry).load("t")
    percentiles = version.reconstruct(x[order[:n_fresh]].astype(np.float32))[2]
    return {"percentiles": percentiles, "kind": version.manifest["kind"], "seconds": seconds, "cpu": cpu,
            "cross_fit": version.manifest["anomaly"].get("cross_fit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    started = time.perf_counter()
    print("| table | setting | kinds published | fresh rows | above 90 | above 95 | above 99 | mean | training (s) | CPU (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, x in tables().items():
            for setting in args.settings:
                runs = [run(name, x, seed, setting, Path(tmp)) for seed in args.seeds]
                for seed, r in zip(args.seeds, runs, strict=True):
                    print(json.dumps({"table": name, "seed": seed, "setting": setting, "kind": r["kind"], "cross_fit": r["cross_fit"],
                                      "seconds": round(r["seconds"], 1)}), file=sys.stderr)
                p = np.concatenate([r["percentiles"] for r in runs])
                kinds = ", ".join(sorted({r["kind"] for r in runs}))
                shares = " | ".join(f"{(p > level).mean():.3f}" for level in (90, 95, 99))
                print(f"| {name} | {setting} | {kinds} | {len(p)} | {shares} | {p.mean():.1f} | {np.mean([r['seconds'] for r in runs]):.1f} | "
                      f"{np.mean([r['cpu'] for r in runs]):.1f} |", flush=True)
    print(f"\nseeds {args.seeds}; the whole run {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
