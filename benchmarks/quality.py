"""Quality benchmark: train the shipped Fashion-MNIST configs and compare each with closed-form PCA.

    .venv/bin/python -m benchmarks.quality [--configs configs/fmnist-pca30.toml ...] [--registry DIR] [--api] [--trained]

Prints a Markdown table: kind, code size, test MSE per pixel, summed squared
error per image, PCA at the same size, the ratio, and training seconds. With
``--api`` each version is also judged as a user sees it: ``aeserve serve`` at its
defaults, the 10,000 test images sent to ``reconstruct`` over HTTP, the mean of
the ``errors`` it answers. ``--trained`` measures the newest version already in
``--registry`` for each config's name instead of training one.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from aeserve.models.registry import Registry
from aeserve.training.config import load_run_config
from aeserve.training.data.builtin import FASHION_MNIST_DIR, read_idx
from aeserve.training.trainer import train
from benchmarks.loadgen import served

DEFAULT_CONFIGS = ["configs/fmnist-pca30.toml", "configs/fmnist-mlp30.toml"]


def api_mse(registry: Registry, name: str, version: int) -> float:
    """Test MSE per pixel as the API answers it: the 10,000 test images through HTTP reconstruct, 1,000 a request."""
    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")
    errors: list[float] = []
    with served(registry.root, [name]) as base:
        for start in range(0, len(images), 1000):
            answer = httpx.post(f"{base}/v1/models/{name}/versions/{version}/reconstruct",
                                json={"inputs": images[start:start + 1000].tolist()}, timeout=300)
            answer.raise_for_status()
            errors += answer.json()["errors"]
    return float(np.mean(errors)) / images[0].size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--registry", help="publish here (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--compare-pretraining", action="store_true",
                        help="for rbm configs, also train the same network from random initialisation on the same budget")
    parser.add_argument("--api", action="store_true", help="also judge each version through the HTTP API (the test images)")
    parser.add_argument("--trained", action="store_true", help="measure the newest versions in --registry instead of training")
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
        version = registry.resolve(config.name, "latest") if args.trained else train(config, registry, progress=False)
        wall = float("nan") if args.trained else time.perf_counter() - started
        m = registry.manifest(config.name, version)
        metrics = m["metrics"]
        api = api_mse(registry, config.name, version) if args.api else float("nan")
        rows.append((path, m["kind"], m["code_dim"], metrics["test_mse"], api, metrics["test_sq_err"], metrics["pca_sq_err"],
                     metrics["test_sq_err"] / metrics["pca_sq_err"], metrics.get("map_knn5_accuracy", float("nan")),
                     metrics.get("map_trustworthiness", float("nan")), wall))
        print(f"done {path} version {version}: {metrics['test_sq_err']:.3f} per image, trained in {wall:.0f} s", flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| config | kind | code | test MSE/pixel | through the API | sq. err/image | PCA sq. err/image | ratio | map 5-NN | map trust. | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path, kind, code, mse, api, sq, pca, ratio, knn, trust, wall in rows:
        print(f"| {path} | {kind} | {code} | {mse:.5f} | {api:.5f} | {sq:.3f} | {pca:.3f} | {ratio:.3f} | {knn:.3f} | {trust:.4f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
