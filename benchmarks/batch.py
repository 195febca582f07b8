"""Batch encoding at scale: rows per second and peak memory of `aeserve encode`, beside the HTTP client and Ray.

    .venv/bin/python -m benchmarks.batch [--work /tmp/aeserve-batch-bench] [--big-gb 4] [--skip-big] [--skip-ray]

Sources:
- the 70,000 Fashion-MNIST images (training and test) as one uint8 .npy (70000, 28, 28);
- a float32 .npy of --big-gb GB (rows of 784 values: Fashion-MNIST images repeated with noise, scaled to [0, 1]).

The model is configs/fmnist-mlp30.toml's network (784-1000-500-250-30), trained for one epoch on 5,000 images (the
speed does not depend on the weights). Each way of encoding runs at its defaults:
- `aeserve encode` as its own process under /usr/bin/time -v: the rows/s it prints and its peak RSS;
- the same rows through the HTTP client (`aeserve_client.Client.encode` on the array, which the client splits into
  requests of its default size) against `aeserve serve` at its defaults: rows/s over the calls;
- `aeserve encode --engine ray` on a local Ray cluster (one actor per CPU);
- a Ray Data pipeline, `ray.data.read_numpy(...).map_batches(aeserve.batch.Encoder, concurrency=2)`, 2 actors,
  timed from the dataset's creation to its last batch (the cluster already started).
One training epoch on the big array (`aeserve train`, `train.epochs = 1`, batch 256, a smaller network 784-256-30 so
that the epoch takes minutes, not an hour: the memory is the data path's) runs under /usr/bin/time -v as well.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.loadgen import served

NAME = "fmnist-mlp30"


def fmnist_70k(work: Path) -> Path:
    from aeserve.training.data.builtin import load_fashion_mnist
    from aeserve.training.data.config import DataConfig

    path = work / "fmnist-70k.npy"
    if not path.exists():
        data = load_fashion_mnist(DataConfig())
        np.save(path, np.concatenate([data.train_x, data.test_x]).astype(np.uint8).reshape(-1, 28, 28))
    return path


def big_npy(work: Path, images: Path, gb: float) -> Path:
    """A float32 .npy of ``gb`` GB, written chunk by chunk (never whole in memory)."""
    path = work / f"big-{gb:g}gb.npy"
    rows = int(gb * 2**30) // (784 * 4)
    if path.exists() and np.load(path, mmap_mode="r").shape == (rows, 784):
        return path
    base = np.load(images).reshape(-1, 784).astype(np.float32) / 255.0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 784))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 65536):
        n = min(65536, rows - start)
        chunk = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.02, (n, 784)).astype(np.float32)
        out[start:start + n] = np.clip(chunk, 0, 1)
    out.flush()
    del out
    return path


def model(work: Path) -> Path:
    from aeserve.models.registry import Registry
    from aeserve.training.config import load_run_config
    from aeserve.training.trainer import train

    registry = Registry(work / "registry")
    if NAME not in registry.names():
        train(load_run_config("configs/fmnist-mlp30.toml", ["train.epochs=1", "data.limit=5000", "train.report=false"]), registry, progress=False)
    return registry.root


def timed(command: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MB) of ``command`` under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return done.stdout, wall, peak_kb / 1024


def encode_command(registry: Path, data: Path, out: Path, *flags: str) -> tuple[float, float]:
    """(rows/s as `aeserve encode` prints it, peak RSS MB)."""
    stdout, _, peak = timed([sys.executable, "-m", "aeserve", "encode", NAME, "--data", str(data), "--out", str(out),
                             "--registry", str(registry), "--overwrite", "--quiet", *flags])
    return float(re.search(r"\(([\d,]+) rows/s\)", stdout).group(1).replace(",", "")), peak


def over_http(registry: Path, data: Path) -> float:
    from aeserve_client import Client

    x = np.load(data)
    with served(registry, [NAME]) as base:
        client = Client(base, timeout=120)
        client.encode(NAME, x[:256])  # warm the connection
        start = time.perf_counter()
        client.encode(NAME, x)
        return len(x) / (time.perf_counter() - start)


def ray_data(registry: Path, data: Path) -> float:
    import ray

    from aeserve.batch import Encoder

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        start = time.perf_counter()
        rows = 0
        ds = ray.data.read_numpy(str(data), override_num_blocks=8).map_batches(
            Encoder, fn_constructor_kwargs=dict(registry=str(registry), name=NAME, version=1), concurrency=2, batch_size=8192,
            num_cpus=0.5)
        for batch in ds.iter_batches(batch_size=None):
            rows += len(batch["code"])
        return rows / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def train_epoch(work: Path, data: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one training epoch on ``data``."""
    config = work / "big-train.toml"
    config.write_text(f'name = "big"\n[data]\nsource = "npy"\npath = "{data}"\n[model]\nkind = "mlp"\ncode_dim = 30\n'
                      'hidden = [256]\n[train]\nepochs = 1\nbatch_size = 256\nreport = false\n')
    _, wall, peak = timed([sys.executable, "-m", "aeserve", "train", str(config), "--registry", str(work / "train-registry"), "--quiet"])
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/aeserve-batch-bench")
    parser.add_argument("--big-gb", type=float, default=4.0)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images = fmnist_70k(work)
    registry = model(work)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    print("| source | way | rows/s | peak RSS (MB) |")
    print("| --- | --- | ---: | ---: |")
    rate, peak = encode_command(registry, images, work / "codes.parquet")
    print(f"| {images.name} (70,000) | aeserve encode | {rate:,.0f} | {peak:,.0f} |", flush=True)
    print(f"| {images.name} (70,000) | HTTP client, aeserve serve | {over_http(registry, images):,.0f} | |", flush=True)
    if not args.skip_ray:
        rate, _ = encode_command(registry, images, work / "codes-ray.parquet", "--engine", "ray")
        print(f"| {images.name} (70,000) | aeserve encode --engine ray | {rate:,.0f} | |", flush=True)
        print(f"| {images.name} (70,000) | Ray Data, 2 Encoder actors | {ray_data(registry, images):,.0f} | |", flush=True)
    if not args.skip_big:
        big = big_npy(work, images, args.big_gb)
        rows = np.load(big, mmap_mode="r").shape[0]
        rate, peak = encode_command(registry, big, work / "codes-big.parquet")
        print(f"| {big.name} ({rows:,}) | aeserve encode | {rate:,.0f} | {peak:,.0f} |", flush=True)
        wall, peak = train_epoch(work, big)
        print(f"| {big.name} ({rows:,}) | aeserve train, one epoch ({wall:.0f} s) | {rows / wall:,.0f} | {peak:,.0f} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
