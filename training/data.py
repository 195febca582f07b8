"""Data sources: Fashion-MNIST (IDX files), scikit-learn's 8x8 digits, and the user's .npy/.npz/.csv.

Every loader returns raw arrays plus the preprocessing that maps them to [0, 1];
the preprocessing goes into the manifest and is applied again when serving.
Problems with a file raise DataError naming the file and what is wrong.
"""
from __future__ import annotations

import gzip
import hashlib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from annotated_types import Interval

from aeserve.models.config import Config, Count
from aeserve.models.preprocessing import Preprocessing

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


Fraction = Annotated[float, Interval(ge=0, lt=0.5)]


@dataclass(frozen=True)
class DataConfig(Config):
    section = "data"

    source: Source = "fashion-mnist"
    path: str = ""
    # Fraction of the training examples held out for validation (model selection only).
    val_fraction: Fraction = 0.1
    # For sources without a test split: fraction held out as the test set for the final metrics.
    test_fraction: Fraction = 0.1
    # Use only the first N training examples (0: all); for quick tries and tests.
    limit: Count = 0
    # Fashion-MNIST only: fetch the IDX files into `path` when they are missing.
    download: bool = False


@dataclass
class Dataset:
    """Raw examples: x arrays are (n, *input_shape), labels (n,) int64 or None."""

    name: str
    train_x: np.ndarray
    test_x: np.ndarray
    preprocessing: Preprocessing
    train_y: np.ndarray | None = None
    test_y: np.ndarray | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 over the raw train and test arrays: names exactly which data a model saw."""
        h = hashlib.sha256()
        for a in (self.train_x, self.test_x):
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


# --- Fashion-MNIST ---------------------------------------------------------------

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
    return _split_off_test("digits", x, bunch.target.astype(np.int64), config, Preprocessing(input_shape=(8, 8), offset=0.0, scale=1 / 16))


# --- the user's own arrays -------------------------------------------------------

def _require_path(config: DataConfig) -> Path:
    if not config.path:
        raise DataError(f"data.source {config.source!r} needs data.path (a file)")
    path = Path(config.path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def _check_finite(path: Path, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected numbers, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) < 2:
        raise DataError(f"{path}: expected an array of shape (n, ...) with n >= 2, got {x.shape}")
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.dtype.kind == "f" else np.zeros(len(x), bool)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} row(s) hold NaN or infinite values, first at row {int(np.argmax(bad))}")
    return x


def _min_max(path: Path, x: np.ndarray) -> Preprocessing:
    low, high = float(np.min(x)), float(np.max(x))
    if not high > low:
        raise DataError(f"{path}: all values equal {low}; nothing to learn")
    return Preprocessing(input_shape=x.shape[1:], offset=low, scale=1.0 / (high - low))


def _split_off_test(name: str, x: np.ndarray, y: np.ndarray | None, config: DataConfig, preprocessing: Preprocessing) -> Dataset:
    """Hold out a seeded ``test_fraction`` of the examples as the test split."""
    order = np.random.default_rng(12345).permutation(len(x))
    n_test = max(1, int(round(len(x) * config.test_fraction))) if config.test_fraction > 0 else 0
    test, train = order[:n_test], order[n_test:]
    test_y, train_y = (None, None) if y is None else (y[test], y[train])
    return Dataset(name, x[train], x[test], preprocessing, train_y, test_y)


def load_npy(config: DataConfig) -> Dataset:
    path = _require_path(config)
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    x = _check_finite(path, x)
    return _split_off_test(path.name, x, None, config, _min_max(path, x))


def load_npz(config: DataConfig) -> Dataset:
    """An .npz with ``x`` (or ``x_train``, optionally ``x_test``) and optional ``y``/``y_train``/``y_test``."""
    path = _require_path(config)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz archive ({e})") from None
    if "x_train" in arrays:
        train_x = _check_finite(path, arrays["x_train"])
        preprocessing = _min_max(path, train_x)
        if "x_test" in arrays:
            test_x = _check_finite(path, arrays["x_test"])
            if test_x.shape[1:] != train_x.shape[1:]:
                raise DataError(f"{path}: x_test rows {test_x.shape[1:]} differ from x_train rows {train_x.shape[1:]}")
            y = {k: arrays[k].astype(np.int64) if k in arrays else None for k in ("y_train", "y_test")}
            return Dataset(path.name, train_x, test_x, preprocessing, y["y_train"], y["y_test"])
        return _split_off_test(path.name, train_x, arrays.get("y_train"), config, preprocessing)
    if "x" not in arrays:
        raise DataError(f"{path}: expected an array named 'x' or 'x_train', found {sorted(arrays)}")
    x = _check_finite(path, arrays["x"])
    y = arrays.get("y")
    return _split_off_test(path.name, x, None if y is None else y.astype(np.int64), config, _min_max(path, x))


def load_csv(config: DataConfig) -> Dataset:
    """A CSV of numbers, one example per row, no header."""
    path = _require_path(config)
    rows: list[list[float]] = []
    with open(path, newline="") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().split(",")
            if rows and len(fields) != len(rows[0]):
                raise DataError(f"{path}: line {line_no} has {len(fields)} values, earlier rows have {len(rows[0])} (ragged rows)")
            try:
                rows.append([float(v) for v in fields])
            except ValueError:
                raise DataError(f"{path}: line {line_no} holds a value that is not a number: {line.strip()[:80]!r}") from None
    x = _check_finite(path, np.asarray(rows, dtype=np.float32))
    return _split_off_test(path.name, x, None, config, _min_max(path, x))


SOURCES: dict[str, Callable[[DataConfig], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "npy": load_npy,
    "npz": load_npz,
    "csv": load_csv,
}
Source = Literal[tuple(SOURCES)]  # data.source: one of the loaders above


def load_dataset(config: DataConfig) -> Dataset:
    dataset = SOURCES[config.source](config)
    if config.limit:
        dataset.train_x = dataset.train_x[: config.limit]
        dataset.train_y = None if dataset.train_y is None else dataset.train_y[: config.limit]
    return dataset
