"""Quality benchmark: train the shipped Fashion-MNIST configs and compare each with closed-form PCA.

    .venv/bin/python -m benchmarks.quality [--configs configs/fmnist-pca30.toml ...] [--registry DIR]

Prints a Markdown table: kind, code size, test MSE per pixel, summed squared
error per image, PCA at the same size, the ratio, and training seconds.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from aeserve.models.registry import Registry
from aeserve.training.config import load_run_config
from aeserve.training.trainer import train

DEFAULT_CONFIGS = ["configs/fmnist-pca30.toml", "configs/fmnist-mlp30.toml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--registry", help="publish here (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--compare-pretraining", action="store_true",
                        help="for rbm configs, also train the same network from random initialisation on the same budget")
    args = parser.parse_args()
    registry = Registry(args.registry or tempfile.mkdtemp(prefix="aeserve-quality-"))
    runs = [(path, args.overrides) for path in args.configs]
    if args.compare_pretraining:
        runs += [(path, [*args.overrides, "model.pretrain=false", f"name={Path(path).stem}-random"])
                 for path in args.configs if load_run_config(path).model_kind == "rbm"]
    rows = []
    for path, overrides in runs:
        config = load_run_config(path, overrides)
        path = f"{path} ({config.name})" if config.name != Path(path).stem else path
        started = time.perf_counter()
        version = train(config, registry, progress=False)
        wall = time.perf_counter() - started
        m = registry.manifest(config.name, version)
        metrics = m["metrics"]
        rows.append((path, m["kind"], m["code_dim"], metrics["test_mse"], metrics["test_sq_err"], metrics["pca_sq_err"],
                     metrics["test_sq_err"] / metrics["pca_sq_err"], metrics.get("map_knn5_accuracy", float("nan")),
                     metrics.get("map_trustworthiness", float("nan")), wall))
        print(f"done {path}: {metrics['test_sq_err']:.3f} per image in {wall:.0f} s", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| config | kind | code | test MSE/pixel | sq. err/image | PCA sq. err/image | ratio | map 5-NN | map trust. | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, kind, code, mse, sq, pca, ratio, knn, trust, wall in rows:
        print(f"| {path} | {kind} | {code} | {mse:.5f} | {sq:.3f} | {pca:.3f} | {ratio:.3f} | {knn:.3f} | {trust:.4f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
