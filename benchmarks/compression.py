"""Compression: aeserve's rate points against JPEG, WebP and PNG on the 10,000 Fashion-MNIST test images.

    .venv/bin/python -m benchmarks.compression --registry /tmp/rd --models fmnist-rd-1 fmnist-rd-2 fmnist-rd-3 fmnist-rd-4

Each aeserve version is served by `aeserve serve` on loopback; the test images go through `compress` (the bytes per
image are the whole stream, header included: what an app stores) and the streams back through `decompress` (the
PSNR is of what comes back, against the original 8-bit pixels). JPEG, WebP (several qualities) and PNG go through
Pillow, their bytes being the whole file. PSNR is the mean over images of 10 log10(255^2 / MSE), as the issue's
figures are. The BD-rate against WebP (negative: fewer bytes at the same PSNR) is computed with the `bjontegaard`
package (pchip interpolation) over the PSNR range both curves cover. Prints markdown tables and writes a PNG plot.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from aeserve.training.data.builtin import FASHION_MNIST_DIR, read_idx
from benchmarks.loadgen import served

WEBP_QUALITIES = (0, 5, 10, 20, 30, 50, 70, 90)
JPEG_QUALITIES = (5, 10, 30, 50, 70, 90)
BATCH = 1000  # images per request


def psnr(decoded: np.ndarray, images: np.ndarray) -> float:
    """Mean over images of the PSNR of 8-bit pixels (decoded rounded to 0..255 first, as a viewer shows them)."""
    decoded = np.clip(np.round(decoded.astype(np.float64)), 0, 255).reshape(len(images), -1)
    mse = ((decoded - images.reshape(len(images), -1).astype(np.float64)) ** 2).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def pillow_point(images: np.ndarray, fmt: str, **options) -> tuple[float, float]:
    sizes, decoded = [], []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, fmt, **options)
        sizes.append(buffer.tell())
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L")))
    return float(np.mean(sizes)), psnr(np.stack(decoded), images)


def aeserve_point(base: str, model: str, images: np.ndarray) -> tuple[float, float, float, float]:
    """(bytes per image, PSNR, compress images/s, decompress images/s) through the HTTP API."""
    sizes, decoded, seconds = [], [], [0.0, 0.0]
    with httpx.Client(base_url=base, timeout=300) as client:
        for start in range(0, len(images), BATCH):
            rows = images[start:start + BATCH].astype(np.float32)
            t = time.perf_counter()
            answer = client.post(f"/v1/models/{model}/compress", json={"inputs": rows.tolist()})
            seconds[0] += time.perf_counter() - t
            answer.raise_for_status()
            streams = answer.json()["outputs"]
            sizes += [len(base64.b64decode(s)) for s in streams]
            t = time.perf_counter()
            back = client.post(f"/v1/models/{model}/decompress", json={"inputs": streams})
            seconds[1] += time.perf_counter() - t
            back.raise_for_status()
            decoded.append(np.asarray(back.json()["outputs"], dtype=np.float32))
    return float(np.mean(sizes)), psnr(np.concatenate(decoded), images), len(images) / seconds[0], len(images) / seconds[1]


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if label.startswith("aeserve") else ".--", label=label)
    ax.set_xlabel("bytes per image (whole file or stream)")
    ax.set_ylabel("PSNR (dB), mean over images")
    ax.set_title("Fashion-MNIST test images (10,000), 28x28 grey")
    ax.set_xlim(0, 600)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="registry holding the rate points")
    parser.add_argument("--models", nargs="+", required=True, help="the rate points' names (their latest versions)")
    parser.add_argument("--images", type=int, default=10_000, help="test images to use (default: all 10,000)")
    parser.add_argument("--plot", default="docs/compression.png", help="where to write the rate-distortion plot")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import bjontegaard

    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")[:args.images]
    rows: list[tuple[str, str, float, float, str]] = []
    curves: dict[str, list[tuple[float, float]]] = {"aeserve": [], "WebP": [], "JPEG": []}
    with served(args.registry, args.models) as base:
        for model in args.models:
            size, quality, up, down = aeserve_point(base, model, images)
            rows.append(("aeserve", model, size, quality, f"compress {up:,.0f} images/s, decompress {down:,.0f} images/s"))
            curves["aeserve"].append((size, quality))
    for q in WEBP_QUALITIES:
        size, quality = pillow_point(images, "WEBP", quality=q, method=6)
        rows.append(("WebP", f"quality {q}", size, quality, "method 6"))
        curves["WebP"].append((size, quality))
    for q in JPEG_QUALITIES:
        size, quality = pillow_point(images, "JPEG", quality=q, optimize=True)
        rows.append(("JPEG", f"quality {q}", size, quality, "optimize"))
        curves["JPEG"].append((size, quality))
    size, quality = pillow_point(images, "PNG", optimize=True)
    rows.append(("PNG", "lossless", size, quality, "optimize"))

    ours, webp = sorted(curves["aeserve"]), sorted(curves["WebP"])
    low, high = max(ours[0][1], webp[0][1]), min(ours[-1][1], webp[-1][1])
    # The WebP points inside the overlap, plus their neighbours outside it, so that pchip interpolates across all of it.
    anchor = [p for i, p in enumerate(webp) if (low <= p[1] <= high) or (i + 1 < len(webp) and webp[i + 1][1] >= low and p[1] < low)
              or (i > 0 and webp[i - 1][1] <= high and p[1] > high)]
    bd_rate = bjontegaard.bd_rate([p[0] for p in anchor], [p[1] for p in anchor], [p[0] for p in ours], [p[1] for p in ours],
                                  method="pchip", require_matching_points=False, min_overlap=0)  # the overlap is chosen above

    print(f"\n{len(images):,} Fashion-MNIST test images\n")
    print("| codec | setting | bytes per image | PSNR (dB) | notes |\n|---|---|---|---|---|")
    for codec, setting, size, quality, note in rows:
        shown = "lossless" if codec == "PNG" else f"{quality:.2f}"  # exact pixels: the PSNR is unbounded
        print(f"| {codec} | {setting} | {size:.1f} | {shown} | {note} |")
    print(f"\nBD-rate of aeserve against WebP (pchip, PSNR {low:.2f}–{high:.2f} dB): {bd_rate:+.1f} %")
    plot({"aeserve (compress)": ours, "WebP (Pillow, method 6)": webp, "JPEG (Pillow)": curves["JPEG"]}, Path(args.plot))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(f"\nplot: {args.plot}\nmachine: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}")
    print(f"command: `.venv/bin/python -m benchmarks.compression {' '.join(sys.argv[1:])}`")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bd_rate_vs_webp": bd_rate, "overlap_db": [low, high]}, indent=2))


if __name__ == "__main__":
    main()
