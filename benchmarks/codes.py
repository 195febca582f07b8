"""Compact codes benchmark: retrieval precision@10 of float, int8 and binary codes, through the HTTP API.

    .venv/bin/python -m benchmarks.codes --registry /tmp/reg-codes --model fmnist-mlp30 [--scale-quantiles 1 0.999 0.99]

Starts `aeserve serve --registry R` on 127.0.0.1 (or uses a running server given by --url), encodes the 10,000
Fashion-MNIST test images with `encode?codes=float|int8|binary` (.npy bodies and answers; the int8 scale from a JSON
answer), and ranks, for every test image, the other 9,999 by distance: precision@10 is the share of its 10 nearest
with the same label, the query itself excluded. Distances: L2 and cosine on float codes and on int8 codes read back as
scale * q, L2 on q itself (an int8 index that ignores the scale), Hamming on binary codes. Hamming distances are
integers and tie often, so ties are broken at random (seeded): the figure is the expected precision of an index that
does not look beyond the bits.

With --scale-quantiles, the float codes of the 60,000 training images (also through the API) give int8 scales by
other rules (the q quantile of |code| / 127; 1 is the largest |code|), each scored the same way on the test codes, with
how far scale * q lies from the float codes: what chose the quantile stored with versions (models/outputs.py
INT8_SCALE_QUANTILE).
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import torch

from benchmarks.serve import start, stop

K = 10
CHUNK = 1000  # queries ranked at a time: (1,000 x 10,000) distances
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode(client: httpx.Client, path: str, images: np.ndarray, codes: str, rows: int = 10_000) -> np.ndarray:
    """The codes of ``images`` (n, 28, 28) uint8 in the form ``codes``, as the .npy answers give them."""
    parts = []
    for start_row in range(0, len(images), rows):
        response = client.post(f"{path}?codes={codes}", content=npy(images[start_row:start_row + rows]),
                               headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
        response.raise_for_status()
        parts.append(np.load(io.BytesIO(response.content)))
    return np.concatenate(parts)


def precision_at_k(distances: Callable[[slice], np.ndarray], labels: np.ndarray) -> float:
    """Mean share of same-label rows among each row's K nearest others; ``distances(rows)`` is (len(rows), n)."""
    n, hits = len(labels), 0
    for start_row in range(0, n, CHUNK):
        rows = slice(start_row, min(start_row + CHUNK, n))
        d = distances(rows).astype(np.float64)
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = np.inf  # not the query itself
        nearest = np.argpartition(d, K, axis=1)[:, :K]
        hits += int((labels[nearest] == labels[rows, None]).sum())
    return hits / (n * K)


def l2(x: np.ndarray) -> Callable[[slice], np.ndarray]:
    x = x.astype(np.float64)
    norms = (x * x).sum(axis=1)
    return lambda rows: norms[rows, None] + norms[None, :] - 2 * x[rows] @ x.T


def cosine(x: np.ndarray) -> Callable[[slice], np.ndarray]:
    x = x.astype(np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return lambda rows: -(unit[rows] @ unit.T)


def hamming(bits: np.ndarray, seed: int = 0) -> Callable[[slice], np.ndarray]:
    """Hamming distances of packed bits (n, bytes) uint8, plus a seeded uniform [0, 1) to break ties at random."""
    rng = np.random.default_rng(seed)
    return lambda rows: POPCOUNT[bits[rows, None, :] ^ bits[None, :, :]].sum(axis=2, dtype=np.int64) + rng.random((rows.stop - rows.start, len(bits)))


def scale_quantile_rows(train_codes: np.ndarray, test_codes: np.ndarray, labels: np.ndarray, quantiles: list[float]) -> list[tuple]:
    from aeserve.models.outputs import CodeQuantization

    rows = []
    for q in quantiles:
        quantization = CodeQuantization.fit(train_codes, q)
        int8 = quantization.int8(test_codes)
        saturated = float((np.abs(int8) == 127).mean())
        error = quantization.dequantize(int8) - test_codes
        relative = float(np.sqrt((error ** 2).mean() / ((test_codes - test_codes.mean(axis=0)) ** 2).mean()))
        rows.append((q, precision_at_k(l2(quantization.dequantize(int8)), labels), saturated, relative))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry", help="served by a server this starts (unless --url)")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--version", default="latest", help="a version number or an alias")
    parser.add_argument("--url", help="a running aeserve server instead of starting one")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="the Fashion-MNIST IDX files")
    parser.add_argument("--scale-quantiles", type=float, nargs="*", default=[],
                        help="also score int8 codes with scales from these quantiles of the training codes' |code|")
    args = parser.parse_args()

    from aeserve.training.data.config import DataConfig
    from aeserve.training.data.sources import load_dataset

    data = load_dataset(DataConfig(source="fashion-mnist", path=args.data))
    labels = np.asarray(data.test_y)
    server = None
    base = args.url
    if base is None:
        base = f"http://127.0.0.1:{args.port}"
        server, _ = start([sys.executable, "-m", "aeserve", "serve", "--registry", args.registry, "--port", str(args.port),
                           "--models", args.model, "--poll-seconds", "0"], args.port)
    path = f"/v1/models/{args.model}/versions/{args.version}/encode"
    try:
        with httpx.Client(base_url=base, timeout=300) as client:
            started = time.perf_counter()
            codes = {form: encode(client, path, data.test_x, form) for form in ("float", "int8", "binary")}
            encode_seconds = time.perf_counter() - started
            first = client.post(f"{path}?codes=int8", json={"inputs": data.test_x[:1].reshape(1, -1).tolist()})
            first.raise_for_status()
            version, scale = first.json()["version"], np.asarray(first.json()["scale"], dtype=np.float32)
            train_codes = encode(client, path, data.train_x, "float") if args.scale_quantiles else None
    finally:
        if server is not None:
            stop(server)

    code_dim = codes["float"].shape[1]
    dequantized = codes["int8"].astype(np.float32) * scale
    rows = [
        ("float32", 4 * code_dim, "L2", precision_at_k(l2(codes["float"]), labels)),
        ("float32", 4 * code_dim, "cosine", precision_at_k(cosine(codes["float"]), labels)),
        ("int8", code_dim, "L2 on scale * q", precision_at_k(l2(dequantized), labels)),
        ("int8", code_dim, "cosine on scale * q", precision_at_k(cosine(dequantized), labels)),
        ("int8", code_dim, "L2 on q (scale ignored)", precision_at_k(l2(codes["int8"]), labels)),
        ("binary", codes["binary"].shape[1], "Hamming (ties at random)", precision_at_k(hamming(codes["binary"]), labels)),
    ]
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}; model {args.model}:{version} "
          f"(code_dim {code_dim}); {len(labels):,} Fashion-MNIST test images encoded through the API in {encode_seconds:.1f} s "
          f"(three forms)\n")
    print(f"| codes | bytes per code | distance | precision@{K} |")
    print("|---|---|---|---|")
    for form, size, distance, precision in rows:
        print(f"| {form} | {size} | {distance} | {precision:.4f} |")
    int8_error = np.abs(dequantized - codes["float"])
    print(f"\nint8 read back as scale * q: largest |error| / scale {float((int8_error / scale).max()):.3f} "
          f"(0.5 unless a code saturates); {float((np.abs(codes['int8']) == 127).mean()) * 100:.2f} % of values at ±127")
    if train_codes is not None:
        print(f"\nint8 scale from the q quantile of |code| over the {len(train_codes):,} training images' codes, / 127:\n")
        print(f"| quantile | precision@{K} (L2 on scale * q) | values at ±127 | RMS error of scale * q / RMS spread of the codes |")
        print("|---|---|---|---|")
        for q, precision, saturated, relative in scale_quantile_rows(train_codes, codes["float"], labels, args.scale_quantiles):
            print(f"| {q:g} | {precision:.4f} | {saturated * 100:.2f} % | {relative:.2e} |")


if __name__ == "__main__":
    main()
