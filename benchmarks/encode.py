"""Batch encoding benchmark: `aeserve encode` rows per second against an in-process `version.encode` of the same rows.

    .venv/bin/python -m benchmarks.encode [--work /tmp/aeserve-encode-bench] [--repeats 3] [--table-rows 200000]

Two sources:
- the 60,000 Fashion-MNIST training images as one uint8 .npy (made from /usr/share/datasets/fashion-mnist through
  training/data/builtin.py), encoded by configs/fmnist-mlp30.toml's network (784-1000-500-250-30; trained for one
  epoch on 5,000 images here: the speed does not depend on the weights);
- a Parquet table of --table-rows rows (16 numbers, a category of 5, a key column), encoded by a table MLP
  (code 8, one hidden layer of 64) with --id key.

`aeserve encode` runs as its own process; its rows/s is what it prints (the job: read, model, write; not the start of
the process nor loading the version), and the wall time of the whole command is shown beside it. The baseline is
`version.encode(x)` in this process over the same rows already in memory, as float32 rows the model takes raw (for the
table, mapped as the server maps named columns), in one call; beside it, the same call with the reading in front (the
rows read as the job reads them, then one call), what a script that reads the file and calls the model does. The
same job also runs in this process (``encode_to_parquet``, what the command calls), without a cold process. Runs
alternate; the best of each counts.
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
import torch

from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config, load_run_config
from aeserve.training.trainer import train


def fmnist_npy(work: Path) -> Path:
    from aeserve.training.data.builtin import load_fashion_mnist
    from aeserve.training.data.config import DataConfig

    path = work / "fmnist-train.npy"
    if not path.exists():
        np.save(path, np.ascontiguousarray(load_fashion_mnist(DataConfig()).train_x))
    return path


def table_parquet(work: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"table-{rows}.parquet"
    if not path.exists():
        rng = np.random.default_rng(0)
        columns = {"key": pa.array([f"item-{i:08d}" for i in range(rows)])}
        latent = rng.normal(size=(rows, 4))
        mixing = rng.normal(size=(4, 16))
        for j, values in enumerate((latent @ mixing + rng.normal(scale=0.1, size=(rows, 16))).T):
            columns[f"x{j:02d}"] = pa.array(values * (10 ** (j % 4)))
        columns["kind"] = pa.array(rng.choice(["a", "b", "c", "d", "e"], rows))
        pq.write_table(pa.table(columns), path, row_group_size=65536)
    return path


def versions(registry: Registry, table: Path) -> None:
    if "fmnist-mlp30" not in registry.names():
        config = load_run_config("configs/fmnist-mlp30.toml", ["train.epochs=1", "data.limit=5000", "train.report=false"])
        train(config, registry, progress=False)
    if "table" not in registry.names():
        train(build_run_config({"name": "table", "data": {"source": "table", "path": str(table), "exclude": ["key"], "categorical": ["kind"],
                                                          "limit": 20000},
                                "model": {"kind": "mlp", "code_dim": 8, "hidden": [64]}, "train": {"epochs": 1, "report": False}}),
              registry, progress=False)


def raw_rows(version, data: Path) -> np.ndarray:
    """Every row of ``data`` as the version takes it raw, in memory: the baseline's input."""
    from aeserve.training.batch.inputs import open_source

    return np.concatenate([np.asarray(block.rows, np.float32) for block in open_source(str(data), version).blocks(65536)])


def baseline(version, x: np.ndarray) -> float:
    start = time.perf_counter()
    version.encode(x)
    return len(x) / (time.perf_counter() - start)


def baseline_reading(version, data: Path) -> float:
    """Rows/s of the same call with the reading in front: every row read as the job reads it, then one call."""
    start = time.perf_counter()
    x = raw_rows(version, data)
    version.encode(x)
    return len(x) / (time.perf_counter() - start)


def job_here(version, name: str, data: Path, out: Path, id_column: str | None) -> float:
    """The same job in this process (``encode_to_parquet``, what the command runs): rows/s without a cold process."""
    from aeserve.training.batch import Encoder
    from aeserve.training.batch.job import encode_to_parquet

    start = time.perf_counter()
    result = encode_to_parquet(Encoder(loaded=version), str(data), str(out), id_column, overwrite=True, progress=False)
    return result.rows / (time.perf_counter() - start)


def job(registry: Registry, name: str, data: Path, out: Path, *flags: str) -> tuple[float, float]:
    """(rows/s as the command prints it, rows/s over the command's wall time)."""
    command = [sys.executable, "-m", "aeserve", "encode", name, "--data", str(data), "--out", str(out), "--registry", str(registry.root),
               "--overwrite", "--quiet", *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rows = int(re.search(r"wrote ([\d,]+) codes", done.stdout).group(1).replace(",", ""))
    return float(re.search(r"\(([\d,]+) rows/s\)", done.stdout).group(1).replace(",", "")), rows / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/aeserve-encode-bench", help="folder for the data, the registry and the codes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table-rows", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    registry = Registry(work / "registry")
    images, table = fmnist_npy(work), table_parquet(work, args.table_rows)
    versions(registry, table)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f} at the start")
    print("| source | rows | in-process version.encode (rows/s) | aeserve encode job (rows/s) | ratio | whole command (rows/s) "
          "| the job in-process (rows/s) | ratio | in-process read + version.encode (rows/s) | job ÷ it |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, data, flags in (("fmnist-mlp30", images, ()), ("table", table, ("--id", "key"))):
        version = registry.load(name)
        x = raw_rows(version, data)
        inside, jobs, walls, here, reading = [], [], [], [], []
        for _ in range(args.repeats):
            inside.append(baseline(version, x))
            reading.append(baseline_reading(version, data))
            rate, wall = job(registry, name, data, work / f"{name}.parquet", *flags)
            jobs.append(rate)
            walls.append(wall)
            here.append(job_here(version, name, data, work / f"{name}-here.parquet", flags[1] if flags else None))
        best = max(inside)
        print(f"| {data.name} | {len(x):,} | {best:,.0f} | {max(jobs):,.0f} | {max(jobs) / best:.2f} | {max(walls):,.0f} "
              f"| {max(here):,.0f} | {max(here) / best:.2f} | {max(reading):,.0f} | {max(jobs) / max(reading):.2f} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
