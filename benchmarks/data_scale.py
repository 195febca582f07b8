"""Bigger than memory: one epoch on a 4 GB float32 .npy with the training process's peak RSS bounded.

    .venv/bin/python -m benchmarks.data_scale [--rows 1000000] [--features 1024] [--folder /tmp]

Writes a (rows, features) float32 .npy (default 1,000,000 x 1,024 = 4.1 GB) of structured values (a rank-16 signal
plus noise, written 16,384 rows at a time) into a temporary folder, then runs `aeserve train` on it as its own
process with a small MLP config (code 16, one hidden layer of 128, batch 512, one epoch, no report) and samples that
process's peak resident set (VmHWM in /proc/PID/status, which counts touched pages of the memory-mapped file too)
while it runs. Prints one markdown table: peak RSS against the 1.5 GB floor, training rows per second end to end
(load, finite check, scaling fit, fingerprint, the epoch, held-out metrics and publishing) and the epoch's share.
The array and the registry are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FLOOR_MB = 1536  # peak RSS of the training process: 1.5 GB
WRITE_ROWS = 16_384

CONFIG = """name = "data-scale"

[data]
source = "npy"
path = "{path}"

[model]
kind = "mlp"
code_dim = 16
hidden = [128]

[train]
epochs = 1
batch_size = 512
report = false
"""


def write_array(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """(rows, features) float32: a rank-16 signal plus noise, written in blocks through a memory-mapped .npy."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, features)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    for start in range(0, rows, WRITE_ROWS):
        n = min(WRITE_ROWS, rows - start)
        block = rng.standard_normal((n, 16), dtype=np.float32) @ basis
        block += 0.1 * rng.standard_normal((n, features), dtype=np.float32)
        out[start:start + n] = block
    out.flush()
    del out


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set so far) of process ``pid`` in MB; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def run(rows: int, features: int, folder: Path) -> dict:
    path = folder / "big.npy"
    started = time.perf_counter()
    write_array(path, rows, features)
    write_seconds = time.perf_counter() - started
    (folder / "config.toml").write_text(CONFIG.format(path=path))
    command = [sys.executable, "-m", "aeserve", "train", str(folder / "config.toml"), "--registry", str(folder / "registry")]
    started = time.perf_counter()
    log_path = folder / "train.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        peak, epoch_done = 0.0, None
        while process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid))
            if epoch_done is None and "epoch 1/1" in log_path.read_text():
                epoch_done = time.perf_counter() - started
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"aeserve train failed ({process.returncode}):\n{log_path.read_text()[-4000:]}")
    manifest = json.loads(next((folder / "registry").rglob("manifest.json")).read_text())
    training = manifest["training"]
    return {"rows": rows, "features": features, "gb": path.stat().st_size / 1e9, "write_seconds": write_seconds,
            "peak_rss_mb": peak, "seconds": seconds, "epoch_done": epoch_done, "n_train": training["n_train"],
            "n_val": training["n_val"], "sample_rows": training["sample_rows"], "metrics": manifest["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where the temporary array and registry go")
    args = parser.parse_args()
    need = args.rows * args.features * 4 * 1.05
    free = shutil.disk_usage(args.folder).free
    if free < need:
        raise SystemExit(f"{args.folder}: {free / 1e9:.1f} GB free, the array needs {need / 1e9:.1f} GB; pass --folder elsewhere")
    folder = Path(tempfile.mkdtemp(prefix="aeserve-data-scale-", dir=args.folder))
    try:
        r = run(args.rows, args.features, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    m = r["metrics"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"command: {' '.join(['python', '-m', 'benchmarks.data_scale'] + sys.argv[1:])}")
    print()
    print("| array | peak RSS (VmHWM) | floor | training rows/s end to end | wall | n_train / n_val / n_test | sample_rows | test_sq_err | ratio_to_pca |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['rows']:,} x {r['features']:,} float32 ({r['gb']:.2f} GB) | {r['peak_rss_mb']:,.0f} MB | "
          f"{'met' if r['peak_rss_mb'] <= FLOOR_MB else 'MISSED'} (<= {FLOOR_MB} MB) | {r['n_train'] / r['seconds']:,.0f} | "
          f"{r['seconds']:.0f} s (array written in {r['write_seconds']:.0f} s) | {r['n_train']:,} / {r['n_val']:,} / {m['n_test']:,} | "
          f"{r['sample_rows']:,} | {m['test_sq_err']:.4g} | {m['ratio_to_pca']:.3g} |")
    if r["epoch_done"]:
        print(f"\nthe epoch line appeared after {r['epoch_done']:.0f} s of {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
