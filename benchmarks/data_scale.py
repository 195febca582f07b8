"""Bigger than memory: one epoch on a 4 GB .npy with peak RSS bounded, and images per second from an image folder.

    .venv/bin/python -m benchmarks.data_scale [--rows 1000000] [--features 1024] [--folder /tmp]
                                              [--images 20000] [--only array|images]

Array: writes a (rows, features) float32 .npy (default 1,000,000 x 1,024 = 4.1 GB) of structured values (a rank-16
signal plus noise, written 16,384 rows at a time) into a temporary folder, then runs `aeserve train` on it as its own
process with a small MLP config (code 16, one hidden layer of 128, batch 512, one epoch, no report) and samples that
process's peak resident set (VmHWM in /proc/PID/status, which counts touched pages of the memory-mapped file too)
while it runs. Prints one markdown table: peak RSS against the 1.5 GB floor, training rows per second end to end
(load, finite check, scaling fit, fingerprint, the epoch, held-out metrics and publishing) and the epoch's share.

Image folder: writes the first --images Fashion-MNIST training images (/usr/share/datasets/fashion-mnist) as 28 x 28
gray PNG files, one subfolder per label. First the decoding alone: one epoch's batches of 256 drawn from the folder
decoded lazily, with no model, with data.workers = 0 and at its default. Then `aeserve train` on the folder (conv,
channels [16, 32], code 16, batch 256, one epoch, no report) three times: decoded lazily with data.workers = 0 (in the
training process) and at its default, and decoded into memory (data.decode = "memory") for reference. Each run is its
own process; timings come from it (the load: listing plus the pass over the files; the epoch: `fit`, its training
steps and the validation errors). Peak memory: the training process's VmHWM, and the peak of the proportional set
size (Pss, shared pages split between the processes that share them) summed over it and its DataLoader workers.
The array, the images and the registries are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.loadgen import proc_mb, processes

FLOOR_MB = 1536  # peak RSS of the training process: 1.5 GB
WRITE_ROWS = 16_384
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

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


IMAGE_CONFIG = """name = "data-scale-images"

[data]
source = "images"
path = "{path}"
decode = "{decode}"
{workers}
[model]
kind = "conv"
code_dim = 16
channels = [16, 32]

[train]
epochs = 1
batch_size = 256
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
            peak = max(peak, proc_mb(process.pid, "status", "VmHWM"))  # VmHWM: the peak resident set so far
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


def write_images(folder: Path, n: int) -> float:
    """The first ``n`` Fashion-MNIST training images as gray PNG files, folder/<label>/<i>.png; the seconds it took."""
    from PIL import Image

    from aeserve.training.data.builtin import read_idx

    x = read_idx(Path(FASHION_MNIST) / "train-images-idx3-ubyte.gz")[:n]
    y = read_idx(Path(FASHION_MNIST) / "train-labels-idx1-ubyte.gz")[:n]
    started = time.perf_counter()
    for label in np.unique(y):
        (folder / str(label)).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        Image.fromarray(image).save(folder / str(label) / f"{i:06d}.png")
    return time.perf_counter() - started


def timed_train(config: str, registry: str, state: str) -> None:
    """In the child process: `aeserve train`, with the load and `fit` timed; prints a BENCH line of JSON at the end."""
    from aeserve.cli import main as aeserve
    from aeserve.training import trainer

    times = {}

    def timed(name, real):
        def call(*args, **kwargs):
            started = time.perf_counter()
            result = real(*args, **kwargs)
            times[name] = time.perf_counter() - started
            return result
        return call

    trainer.load_dataset = timed("load", trainer.load_dataset)
    trainer.fit = timed("fit", trainer.fit)
    code = aeserve(["train", config, "--registry", registry, "--state-dir", state, "--quiet"])
    print("BENCH " + json.dumps(times), flush=True)
    raise SystemExit(code)


def decode_rates(images: Path) -> list[tuple[int, float]]:
    """(workers, images/s) of drawing one epoch's batches of 256 from the folder decoded lazily, with no model: the
    decoding alone (listing and the pass over the files left out), with 0 workers and the default."""
    from aeserve.training.data.config import DataConfig
    from aeserve.training.data.parallel import decoding_workers
    from aeserve.training.data.rows import ModelRows
    from aeserve.training.data.sources import load_dataset

    rates = []
    for workers in (0, DataConfig.workers):
        dataset = load_dataset(DataConfig(source="images", path=str(images), decode="lazy", workers=workers))
        rows = ModelRows(dataset.train_x, dataset.preprocessing)
        draws = list(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).split(256))
        started = time.perf_counter()
        for _ in rows.batches(draws):
            pass
        rates.append((decoding_workers(workers), len(rows) / (time.perf_counter() - started)))
    return rates


def run_images(folder: Path, n: int) -> tuple[float, list[tuple[int, float]], list[dict]]:
    images = folder / "images"
    write_seconds = write_images(images, n)
    rates = decode_rates(images)
    results = []
    for name, decode, workers in (("lazy, data.workers = 0", "lazy", "workers = 0\n"), ("lazy, data.workers default", "lazy", ""),
                                  ("in memory (data.decode = \"memory\"), default workers", "memory", "")):
        run_folder = folder / decode / str(len(results))
        run_folder.mkdir(parents=True)
        (run_folder / "config.toml").write_text(IMAGE_CONFIG.format(path=images, decode=decode, workers=workers))
        command = [sys.executable, "-m", "benchmarks.data_scale", "--timed-train", str(run_folder / "config.toml"),
                   str(run_folder / "registry"), str(run_folder / "state")]
        log_path = run_folder / "train.log"
        started = time.perf_counter()
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            peak, peak_pss, most_workers = 0.0, 0.0, 0
            while process.poll() is None:
                peak = max(peak, proc_mb(process.pid, "status", "VmHWM"))
                training, *workers_now = processes(process.pid)  # the workers: DataLoader processes
                most_workers = max(most_workers, len(workers_now))
                peak_pss = max(peak_pss, sum(proc_mb(p, "smaps_rollup", "Pss") for p in (training, *workers_now)))
                time.sleep(0.1)
        seconds = time.perf_counter() - started
        log = log_path.read_text()
        if process.returncode:
            raise SystemExit(f"aeserve train failed ({process.returncode}):\n{log[-4000:]}")
        times = json.loads(log.split("BENCH ", 1)[1].splitlines()[0])
        manifest = json.loads(next((run_folder / "registry").rglob("manifest.json")).read_text())
        training = manifest["training"]
        results.append({"name": name, "peak_rss_mb": peak, "peak_pss_mb": peak_pss, "workers_seen": most_workers, "seconds": seconds,
                        **times, "n_train": training["n_train"], "n_val": training["n_val"], "files": training["files"],
                        "metrics": manifest["metrics"]})
        shutil.rmtree(run_folder, ignore_errors=True)
    return write_seconds, rates, results


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--timed-train":  # the image runs' child process
        timed_train(*sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--images", type=int, default=20_000, help="PNG files of the image-folder case (at most 60,000)")
    parser.add_argument("--only", choices=["array", "images"], help="run one case (default: both)")
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where the temporary array, images and registries go")
    args = parser.parse_args()
    need = args.rows * args.features * 4 * 1.05 if args.only != "images" else 0
    free = shutil.disk_usage(args.folder).free
    if free < need:
        raise SystemExit(f"{args.folder}: {free / 1e9:.1f} GB free, the array needs {need / 1e9:.1f} GB; pass --folder elsewhere")
    r = images = None
    if args.only != "images":
        folder = Path(tempfile.mkdtemp(prefix="aeserve-data-scale-", dir=args.folder))
        try:
            r = run(args.rows, args.features, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.only != "array":
        folder = Path(tempfile.mkdtemp(prefix="aeserve-data-scale-images-", dir=args.folder))
        try:
            images = run_images(folder, args.images)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    from aeserve.training.data.config import DataConfig
    from aeserve.training.data.parallel import decoding_workers

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"command: {' '.join(['python', '-m', 'benchmarks.data_scale'] + sys.argv[1:])}")
    if r is not None:
        m = r["metrics"]
        print()
        print("| array | peak RSS (VmHWM) | floor | training rows/s end to end | wall | n_train / n_val / n_test | sample_rows | test_sq_err | ratio_to_pca |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {r['rows']:,} x {r['features']:,} float32 ({r['gb']:.2f} GB) | {r['peak_rss_mb']:,.0f} MB | "
              f"{'met' if r['peak_rss_mb'] <= FLOOR_MB else 'MISSED'} (<= {FLOOR_MB} MB) | {r['n_train'] / r['seconds']:,.0f} | "
              f"{r['seconds']:.0f} s (array written in {r['write_seconds']:.0f} s) | {r['n_train']:,} / {r['n_val']:,} / {m['n_test']:,} | "
              f"{r['sample_rows']:,} | {m['test_sq_err']:.4g} | {m['ratio_to_pca']:.3g} |")
        if r["epoch_done"]:
            print(f"\nthe epoch line appeared after {r['epoch_done']:.0f} s of {r['seconds']:.0f} s")
    if images is not None:
        write_seconds, rates, results = images
        print(f"\nimage folder: {results[0]['files']:,} Fashion-MNIST 28 x 28 gray PNG files (written in {write_seconds:.0f} s); "
              f"data.workers default {DataConfig.workers} -> {decoding_workers(DataConfig.workers)} here")
        print()
        print("| decoding | load (list + pass over the files) | epoch (fit) | training images/s in the epoch | wall | "
              "peak RSS (VmHWM) | peak Pss, with workers | workers seen | test_sq_err |")
        print("|---|---|---|---|---|---|---|---|---|")
        for x in results:
            print(f"| {x['name']} | {x['load']:.1f} s | {x['fit']:.1f} s | {x['n_train'] / x['fit']:,.0f} | {x['seconds']:.0f} s | "
                  f"{x['peak_rss_mb']:,.0f} MB | {x['peak_pss_mb']:,.0f} MB | {x['workers_seen']} | {x['metrics']['test_sq_err']:.4g} |")
        print("\ndecoding alone (one epoch's batches of 256 drawn from the lazy folder, no model): "
              + ", ".join(f"{rate:,.0f} images/s with {workers} worker(s)" for workers, rate in rates))


if __name__ == "__main__":
    main()
