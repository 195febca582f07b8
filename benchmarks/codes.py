"""Compact codes benchmark: retrieval precision@10 of float, int8 and binary codes, through the HTTP API.

    .venv/bin/python -m benchmarks.codes --registry /tmp/reg-codes --model fmnist-mlp30 [--scale-quantiles 1 0.999 0.99]

Starts `aeserve serve --registry R` on 127.0.0.1 (or uses a running server given by --url), encodes the 10,000
Fashion-MNIST test images with `encode?codes=float|int8|binary` (.npy bodies and answers; the int8 scale from a JSON
answer), and ranks, for every test image, the other 9,999 by distance: precision@10 is the share of its 10 nearest
with the same label, the query itself excluded. Distances: L2 and cosine on float codes and on int8 codes read back as
scale * q, L2 on q itself (an int8 index that ignores the scale), Hamming on binary codes. Hamming distances are
integers and tie often, so ties are broken at random (seeded): the figure is the expected precision of an index that
does not look beyond the bits.

With --neighbors, the nearest-neighbour index instead (``aeserve index``, models/index.py): the 60,000 training images
encoded as ``aeserve encode`` stores them (float, int8, binary) and indexed as ``aeserve index`` indexes them (HNSW and
exact), queried with the 10,000 test images' float codes as ``neighbors`` searches with inputs: recall@10 against exact
search in numpy (a found item counts when it lies no farther than the exact 10th nearest, so Hamming ties count
once), and queries per second, one query a call and 10,000 in one call:

    .venv/bin/python -m benchmarks.codes --neighbors --registry /tmp/reg-index --model fmnist-pca30 --work /tmp/codes-bench

With --scale-quantiles, the float codes of the 60,000 training images (also through the API) give int8 scales by
other rules (the q quantile of |code| / 127; 1 is the largest |code|), each scored the same way on the test codes, with
how far scale * q lies from the float codes: what chose the quantile stored with versions (models/outputs.py
INT8_SCALE_QUANTILE).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import platform
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import pyarrow.parquet as pq
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


def exact_tenth(form: str, store: np.ndarray, queries: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Each query's exact K-th smallest distance to the store (float: L2 to the codes; int8: to scale * q; binary:
    Hamming between packed bits), in chunks of CHUNK queries."""
    tenth = []
    if form != "binary":
        points = store.astype(np.float64) * (scale if form == "int8" else 1)
        norms = (points * points).sum(axis=1)
    for start_row in range(0, len(queries), CHUNK // 2):
        q = queries[start_row:start_row + CHUNK // 2]
        if form == "binary":
            d = POPCOUNT[q[:, None, :] ^ store[None, :, :]].sum(axis=2, dtype=np.int64).astype(np.float64)
        else:
            q = q.astype(np.float64)
            d = np.sqrt(np.maximum((q * q).sum(axis=1)[:, None] + norms[None, :] - 2 * q @ points.T, 0))
        tenth.append(np.partition(d, K - 1, axis=1)[:, K - 1])
    return np.concatenate(tenth)


def neighbors_rows(args: argparse.Namespace) -> None:
    from pathlib import Path

    import faiss

    from aeserve.models.index import CodeIndex
    from aeserve.models.registry import Registry
    from aeserve.training.batch.encoder import Encoder
    from aeserve.training.batch.index import build_index
    from aeserve.training.batch.job import encode_to_parquet
    from aeserve.training.data.config import DataConfig
    from aeserve.training.data.sources import load_dataset

    data = load_dataset(DataConfig(source="fashion-mnist", path=args.data))
    registry = Registry(args.registry)
    version = registry.load(args.model, args.version)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "train.npy", np.asarray(data.train_x))
    queries = version.encode(np.asarray(data.test_x, dtype=np.float32))  # what neighbors computes for inputs
    quantization = version.code_quantization
    print(f"machine: {platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} faiss threads, faiss {faiss.__version__}; "
          f"store {len(data.train_x):,} training images, {len(queries):,} test queries, {args.model}:{version.version} (code_dim {version.code_dim})\n")
    print(f"| codes | index | ef_search | build (s) | index (MB) | recall@{K} | queries/s, one a call | queries/s, {len(queries):,} in one call |")
    print("|---|---|---|---|---|---|---|---|")
    for form in ("float", "int8", "binary"):
        codes_file = work / f"{form}.parquet"
        if not codes_file.exists():
            encode_to_parquet(Encoder(loaded=version, codes=form), str(work / "train.npy"), str(codes_file), progress=False)
        table = pq.read_table(codes_file, columns=["code"]).column(0).combine_chunks()
        store = (np.frombuffer(table.buffers()[1], np.uint8).reshape(len(table), -1) if form == "binary"
                 else table.flatten().to_numpy().reshape(len(table), -1))
        query_form = quantization.binary(queries) if form == "binary" else queries
        tenth = exact_tenth(form, store, query_form, quantization.scale.astype(np.float64))
        for structure in ("hnsw", "flat"):
            out = work / f"{form}-{structure}.index"
            started = time.perf_counter()
            build_index(str(codes_file), str(out), version.manifest, structure, overwrite=True)
            build = time.perf_counter() - started
            size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
            index = CodeIndex(out)
            for ef in (args.ef_search if structure == "hnsw" else [None]):
                if ef is not None:
                    index.info = dataclasses.replace(index.info, hnsw={**index.info.hnsw, "ef_search": ef})
                started = time.perf_counter()
                _, distances = index.search(queries, "float", K)
                batch_qps = len(queries) / (time.perf_counter() - started)
                recall = float((distances <= tenth[:, None] * (1 + 1e-5) + 1e-4).sum()) / (len(queries) * K)
                single = queries[:args.single]
                started = time.perf_counter()
                for row in range(len(single)):
                    index.search(single[row:row + 1], "float", K)
                single_qps = len(single) / (time.perf_counter() - started)
                print(f"| {form} | {structure} | {ef or '-'} | {build:.1f} | {size:.1f} | {recall:.4f} | {single_qps:,.0f} | {batch_qps:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="registry", help="served by a server this starts (unless --url)")
    parser.add_argument("--model", default="fmnist-mlp30")
    parser.add_argument("--version", default="latest", help="a version number or an alias")
    parser.add_argument("--url", help="a running aeserve server instead of starting one")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="the Fashion-MNIST IDX files")
    parser.add_argument("--neighbors", action="store_true", help="benchmark the nearest-neighbour index instead (in-process, no server)")
    parser.add_argument("--work", default="/tmp/aeserve-codes-bench", help="--neighbors: where the codes files and indexes are written")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128], help="--neighbors: HNSW candidate lists to try")
    parser.add_argument("--single", type=int, default=2000, help="--neighbors: queries timed one a call")
    parser.add_argument("--scale-quantiles", type=float, nargs="*", default=[],
                        help="also score int8 codes with scales from these quantiles of the training codes' |code|")
    args = parser.parse_args()
    if args.neighbors:
        neighbors_rows(args)
        return

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
