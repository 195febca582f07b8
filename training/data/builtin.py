"""The built-in data sets: Fashion-MNIST (IDX files) and scikit-learn's 8x8 digits, each with its own pixel range."""
from __future__ import annotations

import gzip
import urllib.request
from pathlib import Path

import numpy as np

from aeserve.models.preprocessing import Preprocessing
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset, split_off_test

# --- Fashion-MNIST ---------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000TTDD, then DD big-endian uint32 sizes, then data."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: wrong IDX magic number {raw[:4].hex() or '(empty file)'}; "
                        f"expected 0000, a type byte in {[hex(t) for t in IDX_DTYPES]} and a dimension count")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or oversized IDX data: header says shape {shape} ({expected} bytes), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return folder / f"{stem}.gz"


def download_fashion_mnist(folder: Path) -> None:
    """Fetch the four IDX files from the original site into ``folder`` (user-facing; tests never call it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_FILES.values():
        target = folder / f"{stem}.gz"
        if not target.exists():
            urllib.request.urlretrieve(FASHION_MNIST_URL + f"{stem}.gz", target)


def load_fashion_mnist(config: DataConfig) -> Dataset:
    folder = Path(config.path or FASHION_MNIST_DIR)
    if config.download:
        download_fashion_mnist(folder)
    arrays = {key: read_idx(_idx_path(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match (expected (n, rows, cols) and (n,))")
    return Dataset(
        name="fashion-mnist",
        train_x=arrays["train_x"], train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"], test_y=arrays["test_y"].astype(np.int64),
        preprocessing=Preprocessing(input_shape=arrays["train_x"].shape[1:], offset=0.0, scale=1 / 255),
    )


# --- scikit-learn digits ---------------------------------------------------------

def load_digits(config: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    return split_off_test("digits", x, bunch.target.astype(np.int64), config, Preprocessing(input_shape=(8, 8), offset=0.0, scale=1 / 16))
