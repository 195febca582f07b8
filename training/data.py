"""Data sources: Fashion-MNIST (IDX files), scikit-learn's 8x8 digits, the user's .npy/.npz/.csv arrays, tables and
image folders.

Every loader returns raw arrays; the preprocessing that maps them to the model's space (``data.scaling``) is fitted
on the training split, goes into the version and is applied again when serving. Problems with a file raise
DataError naming the file, and for tables the line as an editor shows it and the column by name.

``data.path`` may also be a URL (``s3://``, ``gs://``, any fsspec filesystem) for arrays, tables and image folders:
read through fsspec as it is needed, never copied whole to disk first (see "data in object storage" below).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import mmap
import os
import sys
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Interval, MaxLen

from aeserve.models.config import Config, Count, Size
from aeserve.models.images import IMAGE_FORMATS, IMAGE_SUFFIXES, image_input_shape, is_gray, open_image, to_pixels
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
    # How values map to the model's space: global (one offset and scale, the data in [0, 1]), minmax (each feature in
    # [0, 1]), standard (each feature mean 0, deviation 1); auto: standard for tables, global for everything else.
    scaling: Literal["auto", "global", "minmax", "standard"] = "auto"
    # Tables: the label column (kept out of the features), the feature columns (default: all but the label and
    # `exclude`), the columns one-hot encoded, and what to do with empty or NA fields.
    label: str = ""
    columns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    missing: Literal["error", "drop", "median"] = "error"
    # Images: every picture brought to [height, width] (default: the first image's size) with channels 1 or 3
    # (0: 1 when every image is gray, else 3); an unreadable file is an error, or skipped and counted with skip_bad.
    image_size: Annotated[tuple[Size, ...], MaxLen(2)] = ()
    channels: Literal[0, 1, 3] = 0
    skip_bad: bool = False
    # Images: decoded once into memory, or lazily as training draws each batch (auto: lazily when the pixels would take
    # more than IMAGE_MEMORY_BYTES), by this many DataLoader worker processes (at most the CPUs; 0: in this process).
    decode: Literal["auto", "memory", "lazy"] = "auto"
    workers: Count = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.image_size) not in (0, 2):
            raise ValueError(f"data.image_size must be [height, width], got {list(self.image_size)}")
        for key in ("columns", "exclude", "categorical"):
            names = getattr(self, key)
            repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
            if repeated is not None:
                raise ValueError(f"data.{key} names {repeated!r} more than once, got {list(names)}")

    @property
    def resolved_scaling(self) -> str:
        if self.scaling != "auto":
            return self.scaling
        return "standard" if self.source == "table" else "global"


@dataclass
class Dataset:
    """Raw examples: x arrays are (n, *input_shape), labels (n,) int64 or None."""

    name: str
    train_x: np.ndarray
    test_x: np.ndarray
    preprocessing: Preprocessing | None  # None until load_dataset fits it
    train_y: np.ndarray | None = None
    test_y: np.ndarray | None = None
    features: list[dict] | None = None  # tables: each feature's name, type and categories, for the manifest
    # Facts about the source for the manifest's training facts: for images the label names, image size, channels,
    # files read and files skipped.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 over the raw train and test arrays: names exactly which data a model saw.

        Rows read from a URL on demand (RemoteArray) are named by the object's identity instead of their bytes, images
        decoded lazily (ImageFiles) by their files' paths and bytes.
        """
        h = hashlib.sha256()
        for a in (self.train_x, self.test_x):
            h.update(str((a.dtype.str, a.shape)).encode())
            if isinstance(a, RemoteArray | ImageFiles):
                h.update(a.identity().encode())
                continue
            for chunk in chunks(a):  # row-major bytes chunk by chunk: the same digest as the whole array's bytes
                h.update(np.ascontiguousarray(chunk).tobytes())
        return h.hexdigest()


# --- reading arrays in chunks -------------------------------------------------------

CHUNK_ROWS = 8192  # rows per pass of the finite check, the scaling fit and the fingerprint
RELEASE_BYTES = 256 * 2**20  # after reading this much of a memory-mapped array, its pages leave the resident set
FAULT_AROUND_BYTES = 64 * 2**10  # what reading one row at a random place may map (Linux's fault_around_bytes)


def release_pages(x: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (a no-op for arrays in memory).

    Pages of a read-only file mapping count as resident once touched; without this a pass over a 4 GB file shows as
    4 GB of RSS. They stay in the kernel's page cache, so reading them again is cheap.
    """
    mapping = getattr(x, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def chunks(x: np.ndarray, rows: int = CHUNK_ROWS):
    """Consecutive row blocks x[i:i + rows] (views), releasing a memory-mapped array's pages as it goes."""
    read = 0
    for start in range(0, len(x), rows):
        chunk = x[start:start + rows]
        yield chunk
        read += chunk.nbytes
        if read >= RELEASE_BYTES:
            release_pages(x)
            read = 0
    release_pages(x)


# --- data in object storage ----------------------------------------------------------

# An array from a URL of up to this many bytes is read whole into memory: training reads rows in a new random order
# every epoch, and from object storage every read is a round trip. A bigger one is read rows on demand (RemoteArray).
REMOTE_WHOLE_BYTES = 256 * 2**20
REMOTE_BLOCK_BYTES = 8 * 2**20  # what one read of a table or archive from a URL fetches (ahead, for sequential reads)
HEADER_BYTES = 64 * 2**10  # what a read of a header (.npy, zip member, CSV header line) from a URL fetches
GAP_BYTES = 64 * 2**10  # rows of a gather at most this far apart are fetched as one range: cheaper than another request


def is_url(path: str) -> bool:
    """Whether ``path`` names object storage (``s3://``, ``gs://``, …) rather than a local path or ``file://`` URL."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"  # a one-letter scheme is a Windows drive


@dataclass(frozen=True)
class RemoteFile:
    """A file or folder in object storage, read through fsspec; messages name it by its URL."""

    url: str
    fs: Any
    path: str  # fsspec's path: the URL without its scheme

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    def child(self, relative: str) -> RemoteFile:
        return RemoteFile(f"{self.url}/{relative}", self.fs, f"{self.path}/{relative}")

    def info(self) -> dict[str, Any] | None:
        """What the store says of the object (size, type, ETag, …), or None when nothing is there."""
        try:
            return self.fs.info(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"{self.url}: cannot be read ({e})") from None

    def open(self, mode: str = "rb", **kwargs: Any):
        return self.fs.open(self.path, mode, **kwargs)

    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges [start, end) of the file, fetched concurrently where the store allows (fsspec's cat_ranges)."""
        try:
            parts = self.fs.cat_ranges([self.path] * len(starts), starts, ends, on_error="raise")
        except OSError as e:
            raise DataError(f"{self.url}: cannot be read ({e})") from None
        for part, start, end in zip(parts, starts, ends, strict=True):
            if len(part) != end - start:
                raise DataError(f"{self.url}: truncated: bytes {start}..{end} asked for, {len(part)} there")
        return parts

    def identity(self) -> str:
        """Names the object's content without reading it whole (hashing it would download it a second time): its size,
        its ETag or checksum as the store reports it (on S3 and GCS a hash of the content), else its modification time,
        and the sha256 of its first and last HEADER_BYTES."""
        info = self.info() or {}
        size = int(info.get("size") or 0)
        content = [key for key in ("ETag", "etag", "md5Hash", "crc32c") if info.get(key)]
        facts = {key: str(info[key]) for key in ["size", *(content or [k for k in ("LastModified", "mtime", "updated", "created") if k in info])]
                 if key in info}
        ends = self.read_ranges([0, max(0, size - HEADER_BYTES)], [min(size, HEADER_BYTES), size])
        return json.dumps(facts, sort_keys=True) + hashlib.sha256(b"".join(ends)).hexdigest()


def location(path: str) -> Path | RemoteFile:
    """A local path (also from a ``file://`` URL), or a file or folder in object storage."""
    if not is_url(path):
        return Path(path.removeprefix("file://"))
    import fsspec

    url = path.rstrip("/")
    try:
        # No listings cache: what the store holds now, never a listing this process made earlier (s3fs would take a
        # file missing from a cached listing of its folder for a file that is not there).
        fs, fs_path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError, TypeError) as e:  # the scheme's package is not installed, or fsspec does not know it
        extra = {"s3": "aeserve[s3]", "s3a": "aeserve[s3]", "gs": "aeserve[gcs]", "gcs": "aeserve[gcs]"}.get(url.partition("://")[0])
        raise DataError(f"{url}: cannot be read ({e}){f'; install {extra}' if extra else ''}") from None
    return RemoteFile(url, fs, fs_path.rstrip("/"))


def kind_of(where: Path | RemoteFile) -> str | None:
    """"file", "directory", or None when nothing is there: on the local disk or as the store reports it."""
    if isinstance(where, Path):
        return "file" if where.is_file() else "directory" if where.is_dir() else None
    return (where.info() or {}).get("type")


def _open(where: Path | RemoteFile, block_size: int = REMOTE_BLOCK_BYTES):
    """A binary file object; from a URL each read fetches at least ``block_size`` bytes (fsspec's read-ahead cache)."""
    return where.open("rb") if isinstance(where, Path) else where.open("rb", block_size=block_size)


@contextmanager
def _opened(where: Path | RemoteFile) -> Iterator[Path | Any]:
    """What a reader that takes a path or a file (zipfile, pyarrow) gets: a local file's path, which it opens itself
    (pyarrow natively), or an fsspec file object, read by range requests REMOTE_BLOCK_BYTES at a time."""
    if isinstance(where, Path):
        yield where
    else:
        with _open(where) as f:
            yield f


class RemoteArray:
    """Rows of an .npy array in object storage, read as they are indexed: what np.memmap is for a local file.

    ``x[i]``, ``x[a:b]`` and ``x[rows]`` are arrays of just those rows, read with range requests: a slice as one range,
    a gather as runs of nearby rows (at most GAP_BYTES apart), fetched concurrently where the store allows.
    ``x.rows(a, b)`` is a view that reads nothing. No block cache: training draws the rows in a new random order
    every epoch, so a cache smaller than the array would seldom hit, and arrays that fit in memory are read whole
    instead (REMOTE_WHOLE_BYTES).
    """

    def __init__(self, file: RemoteFile, offset: int, shape: tuple[int, ...], dtype: np.dtype, start: int = 0, stop: int | None = None) -> None:
        self.file, self.offset, self.dtype = file, offset, np.dtype(dtype)
        self.total, self.row_shape = shape[0], tuple(shape[1:])
        self.start, self.stop = start, shape[0] if stop is None else stop
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def rows(self, start: int | None, stop: int | None) -> RemoteArray:
        """The rows start..stop (as a slice takes them) of these, reading nothing."""
        start, stop, _ = slice(start, stop).indices(len(self))
        return RemoteArray(self.file, self.offset, (self.total, *self.row_shape), self.dtype, self.start + start, self.start + max(start, stop))

    def identity(self) -> str:
        """Names these rows of the object (for the data fingerprint), reading two blocks of it."""
        return f"{self.file.identity()} at {self.offset}, rows {self.start}:{self.stop} of {self.total}"

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._read(start, max(start, stop)) if step == 1 else self._gather(np.arange(start, stop, step))
        if isinstance(key, int | np.integer):
            return self._gather(np.array([key], np.int64))[0]
        rows = np.asarray(key)
        return self._gather(np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop == start:
            return np.empty((0, *self.row_shape), self.dtype)
        begin = self.offset + (self.start + start) * self.row_bytes
        data = self.file.read_ranges([begin], [begin + (stop - start) * self.row_bytes])[0]
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.row_shape)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        wanted, order = np.unique(rows, return_inverse=True)
        if not len(wanted):
            return np.empty((0, *self.row_shape), self.dtype)
        gap = max(1, GAP_BYTES // max(1, self.row_bytes))
        breaks = np.flatnonzero(np.diff(wanted) > gap) + 1
        firsts, lasts = wanted[np.r_[0, breaks]], wanted[np.r_[breaks - 1, len(wanted) - 1]]
        begins = self.offset + (self.start + firsts) * self.row_bytes
        parts = self.file.read_ranges(begins.tolist(), (begins + (lasts - firsts + 1) * self.row_bytes).tolist())
        block = np.frombuffer(b"".join(parts), self.dtype).reshape(-1, *self.row_shape)
        run = np.repeat(np.arange(len(firsts)), np.diff(np.r_[0, breaks, len(wanted)]))  # each wanted row's run
        where = np.r_[0, np.cumsum(lasts - firsts + 1)[:-1]][run] + wanted - firsts[run]  # its place in the block
        return block[where[order]]


def _lazy(x) -> bool:
    """Whether rows of x are read from a file as they are indexed (memory-mapped, from a URL, images decoded lazily)."""
    return isinstance(x, np.memmap | RemoteArray | ImageFiles)


def _take(x, rows: slice | np.ndarray):
    """x[rows]; for a RemoteArray and a slice, or ImageFiles and any rows, a view that reads nothing (as a memory map's
    slice is)."""
    if isinstance(x, ImageFiles):
        return x.rows(rows)
    return x.rows(rows.start, rows.stop) if isinstance(x, RemoteArray) and isinstance(rows, slice) else x[rows]


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

def _require_file(config: DataConfig) -> Path | RemoteFile:
    """data.path as a local file or a file at a URL, or a DataError saying why it is neither."""
    if not config.path:
        raise DataError(f"data.source {config.source!r} needs data.path (a file)")
    where = location(config.path)
    kind = kind_of(where)
    if kind == "directory":
        raise DataError(f"{where}: is a directory; data.source {config.source!r} needs a file")
    if kind != "file":
        raise DataError(f"{where}: file not found")
    return where


class ModelRows:
    """Rows of a raw array (n, *input_shape) in the model's space, scaled when asked for: the training set without a
    float32 copy of the whole of it.

    ``rows[index]`` (a tensor or array of row numbers, or a slice) is a float32 tensor (k, input_dim), the same values
    as scaling everything first and indexing after. ``index`` (m,) picks and orders the rows of ``raw`` this holds.
    """

    def __init__(self, raw: np.ndarray, preprocessing: Preprocessing, index: np.ndarray | None = None) -> None:
        self.raw, self.preprocessing = raw, preprocessing
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self._read = 0

    def __len__(self) -> int:
        return len(self.raw) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.preprocessing.input_dim)

    def subset(self, index) -> ModelRows:
        """The rows ``index`` (m,) of these rows, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return ModelRows(self.raw, self.preprocessing, index if self.index is None else self.index[index])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        rows = key if self.index is None else self.index[key]
        if isinstance(rows, slice):
            raw = self.raw[rows]
            self._touched(raw.nbytes)
        else:
            raw = self._gather(np.asarray(rows))
        return torch.from_numpy(self.preprocessing.to_model(raw))

    def batches(self, row_lists) -> Iterator[torch.Tensor]:
        """self[rows] for each of ``row_lists`` (tensors or arrays of row numbers) in turn: how training draws its
        batches. An image folder decoded lazily decodes them in its DataLoader worker processes, ahead of the consumer."""
        if not isinstance(self.raw, ImageFiles):
            yield from (self[rows] for rows in row_lists)
            return
        lists = [np.asarray(rows) if self.index is None else self.index[np.asarray(rows)] for rows in row_lists]
        for raw in self.raw.batches(lists):
            yield torch.from_numpy(self.preprocessing.to_model(raw))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """raw[rows] in blocks, so that a memory-mapped file's touched pages stay bounded even for a large sample.

        A gathered row maps more than its own bytes: the kernel maps the cached pages around a faulting page too
        (fault-around, 64 KB by default), so each row counts as at least FAULT_AROUND_BYTES.
        """
        row_bytes = max(math.prod(self.raw.shape[1:]) * self.raw.dtype.itemsize, FAULT_AROUND_BYTES)
        block = max(1, RELEASE_BYTES // row_bytes)
        if len(rows) <= block:
            raw = self.raw[rows]
            self._touched(len(rows) * row_bytes)
            return raw
        raw = np.empty((len(rows), *self.raw.shape[1:]), dtype=self.raw.dtype)
        for start in range(0, len(rows), block):
            raw[start:start + block] = self.raw[rows[start:start + block]]
            self._touched(len(rows[start:start + block]) * row_bytes)
        return raw

    def _touched(self, nbytes: int) -> None:
        """Count bytes read; past RELEASE_BYTES a memory-mapped file's pages leave the resident set."""
        self._read += nbytes
        if self._read >= RELEASE_BYTES:
            release_pages(self.raw)
            self._read = 0

    def tensor(self) -> torch.Tensor:
        """Every row, (len, input_dim) float32: only for rows known to fit in memory."""
        return self[slice(None)]


FLOAT32_MAX = float(np.finfo(np.float32).max)  # a finite float64 beyond it becomes infinite as the model's float32


def _beyond_float32(values: np.ndarray) -> np.ndarray:
    """Where ``values`` are finite but become infinite as float32 (a float64 such as 1e300)."""
    with np.errstate(over="ignore"):
        return np.isfinite(values) & np.isinf(values.astype(np.float32))


def _check_finite(path: Path | RemoteFile, x: np.ndarray) -> np.ndarray:
    """x checked for numbers, a shape (n >= 2, d >= 1, ...) and values finite as float32, in chunks of CHUNK_ROWS rows.

    An array in memory comes back as float32 when it holds floats; one read from its file on demand (memory-mapped, or
    from a URL) comes back as it is (no copy), and its rows become float32 batch by batch in ``Preprocessing.to_model``.
    """
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected numbers, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) < 2:
        raise DataError(f"{path}: expected an array of shape (n, ...) with n >= 2, got {x.shape}")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: the rows have no features: shape {x.shape}; expected (n, d, ...) with every size >= 1")
    if x.dtype.kind == "f":
        bad_rows, first, first_row = 0, -1, None
        for start, chunk in zip(range(0, len(x), CHUNK_ROWS), chunks(x), strict=True):
            # As float32, the type the model sees: a float64 beyond float32's range counts as infinite.
            flat = chunk.reshape(len(chunk), -1)
            with np.errstate(over="ignore"):
                bad = ~np.isfinite(flat.astype(np.float32)).all(axis=1)
            if bad.any():
                bad_rows += int(bad.sum())
                if first < 0:
                    first = start + int(np.argmax(bad))
                    first_row = np.array(flat[np.argmax(bad)])
        if bad_rows:
            with np.errstate(over="ignore"):
                column = int(np.argmax(~np.isfinite(first_row.astype(np.float32))))
            if not np.isfinite(first_row[column]):
                raise DataError(f"{path}: {bad_rows} row(s) hold NaN or infinite values, first at row {first}")
            place = f"column {column}" if x.ndim == 2 else f"position {[int(i) for i in np.unravel_index(column, x.shape[1:])]}"
            raise DataError(f"{path}: {bad_rows} row(s) hold NaN, infinite values or values beyond float32's range "
                            f"(±{FLOAT32_MAX:.2g}), first at row {first}, {place}: {first_row[column].item()!r}")
        if not _lazy(x):
            x = x.astype(np.float32, copy=False)  # float32 already (as read from a URL): no second copy
    return x


def fit_scaling(name: str, x: np.ndarray, scaling: str) -> Preprocessing:
    """The preprocessing of ``scaling`` fitted on the training rows ``x`` (n, ...).

    A feature that never varies gets a scale of 1 (it maps to 0); global scaling of data that never varies is an error.
    More than CHUNK_ROWS rows are read in chunks (float32 rows, float64 sums), so a memory-mapped array is never
    copied whole; the standard deviation then comes from a second pass over the rows, around the mean of the first.
    """
    if len(x) > CHUNK_ROWS or isinstance(x, RemoteArray | ImageFiles):
        return _fit_scaling_in_chunks(name, x, scaling)
    flat = x.reshape(len(x), -1)
    if scaling == "global":
        low, high = float(np.min(flat)), float(np.max(flat))
        if not high > low:
            raise DataError(f"{name}: all values equal {low}; nothing to learn")
        return Preprocessing(input_shape=x.shape[1:], offset=low, scale=1.0 / (high - low), scaling="global")
    flat = flat.astype(np.float64)
    if scaling == "minmax":
        offset, spread = flat.min(axis=0), flat.max(axis=0) - flat.min(axis=0)
    else:
        offset, spread = flat.mean(axis=0), flat.std(axis=0)
    scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 1.0)
    return Preprocessing(input_shape=x.shape[1:], offset=offset, scale=scale, scaling=scaling)


def _fit_scaling_in_chunks(name: str, x: np.ndarray, scaling: str) -> Preprocessing:
    def rows(chunk: np.ndarray) -> np.ndarray:
        chunk = chunk.reshape(len(chunk), -1)
        return chunk.astype(np.float32) if chunk.dtype.kind == "f" else chunk

    low = high = None
    total = None
    for chunk in chunks(x):
        flat = rows(chunk)
        if scaling == "standard":
            part = flat.astype(np.float64).sum(axis=0)
            total = part if total is None else total + part
            continue
        axis = None if scaling == "global" else 0
        chunk_low, chunk_high = flat.min(axis=axis), flat.max(axis=axis)
        low = chunk_low if low is None else np.minimum(low, chunk_low)
        high = chunk_high if high is None else np.maximum(high, chunk_high)
    if scaling == "global":
        low, high = float(low), float(high)
        if not high > low:
            raise DataError(f"{name}: all values equal {low}; nothing to learn")
        return Preprocessing(input_shape=x.shape[1:], offset=low, scale=1.0 / (high - low), scaling="global")
    if scaling == "minmax":
        offset, spread = low.astype(np.float64), high.astype(np.float64) - low.astype(np.float64)
    else:
        offset = total / len(x)
        squares = sum(np.square(rows(chunk).astype(np.float64) - offset).sum(axis=0) for chunk in chunks(x))
        spread = np.sqrt(squares / len(x))
    scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 1.0)
    return Preprocessing(input_shape=x.shape[1:], offset=offset, scale=scale, scaling=scaling)


def _split_off_test(name: str, x: np.ndarray, y: np.ndarray | None, config: DataConfig, preprocessing: Preprocessing | None,
                    contiguous: bool | None = None) -> Dataset:
    """Hold out a seeded ``test_fraction`` of the examples as the test split.

    A memory-mapped array is split without a copy: its last ``test_fraction`` rows are the test split and the rows
    before them the training split (views of the file). Shuffle such a file's rows once if they are ordered (by
    label, by time). Arrays in memory get a seeded random split. ``contiguous`` (default: whether x is read from its
    file on demand) says which: an array that a URL gave whole is split as the same local file would be.
    """
    n_test = max(1, int(round(len(x) * config.test_fraction))) if config.test_fraction > 0 else 0
    if _lazy(x) if contiguous is None else contiguous:
        train, test = slice(0, len(x) - n_test), slice(len(x) - n_test, len(x))
    else:
        order = np.random.default_rng(12345).permutation(len(x))
        test, train = order[:n_test], order[n_test:]
    test_y, train_y = (None, None) if y is None else (y[test], y[train])
    return Dataset(name, _take(x, train), _take(x, test), preprocessing, train_y, test_y)


def load_npy(config: DataConfig) -> Dataset:
    """An .npy array (n, ...), memory-mapped: rows are read from the file as training needs them. From a URL the same,
    through range requests (``_array_at``)."""
    where = _require_file(config)
    try:
        if isinstance(where, Path):
            x = np.load(where, mmap_mode="r", allow_pickle=False)
        else:
            with _open(where, HEADER_BYTES) as f:
                header = _npy_header(f)
                if header is None:  # a header version read only whole
                    f.seek(0)
                    x = np.lib.format.read_array(f, allow_pickle=False)
                else:
                    x = _array_at(where, f.tell(), *header)
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .npy array ({e})") from None
    x = _check_finite(where, x)
    return _split_off_test(where.name, x, None, config, None, contiguous=True)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the .npy that ``f`` is at, left at its data; None for a newer header version."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
    if read_header is None:
        return None
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"Python objects in dtype {dtype}; arrays are read without pickle")
    return shape, fortran_order, dtype


def _array_at(where: Path | RemoteFile, offset: int, shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype):
    """The array stored at ``offset`` of a file: memory-mapped from a local file; from a URL read whole when it is at
    most REMOTE_WHOLE_BYTES, else read rows on demand (RemoteArray), which needs its rows contiguous (C order)."""
    if 0 in shape:
        return np.zeros(shape, dtype)
    order = "F" if fortran_order else "C"
    if isinstance(where, Path):
        return np.memmap(where, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes <= REMOTE_WHOLE_BYTES:
        return np.frombuffer(where.read_ranges([offset], [offset + nbytes])[0], dtype).reshape(shape, order=order)
    if fortran_order and len(shape) > 1:
        raise ValueError("stored column-major (Fortran order), so its rows are not contiguous; save it row-major "
                         "(np.ascontiguousarray) to read it from a URL")
    size = int((where.info() or {}).get("size") or 0)
    if size < offset + nbytes:
        raise ValueError(f"truncated: the header says {nbytes} bytes of data, the file holds {max(0, size - offset)}")
    return RemoteArray(where, offset, shape, dtype)


def _npz_member(where: Path | RemoteFile, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npz member: memory-mapped when stored uncompressed (``np.savez``), read into memory when compressed
    (``np.savez_compressed``: a deflated member cannot be mapped, so it must fit in memory). From a URL a stored member
    is read as an .npy is (``_array_at``); a compressed one is streamed through the inflater into memory."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with _open(where, HEADER_BYTES) as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: name and extra field lengths at bytes 26..29
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {info.filename}: bad local header")
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        try:
            header = _npy_header(f)
        except ValueError as e:
            raise ValueError(f"member {info.filename}: {e}") from None
        if header is None:  # a newer header version: read it the ordinary way
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        offset = f.tell()
    return _array_at(where, offset, *header)


def load_npz(config: DataConfig) -> Dataset:
    """An .npz with ``x`` (or ``x_train``, optionally ``x_test``) and optional ``y``/``y_train``/``y_test``.

    Members saved uncompressed (``np.savez``) are memory-mapped; compressed ones (``np.savez_compressed``) are read
    into memory, so a bigger-than-memory array belongs in an .npy or an uncompressed .npz. An uncompressed member
    is split as an .npy is (its last rows held out), a compressed one at random.
    """
    where = _require_file(config)
    try:
        with _opened(where) as source, zipfile.ZipFile(source) as archive:
            members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            arrays = {info.filename[:-4]: _npz_member(where, archive, info) for info in members}
            stored = {info.filename[:-4]: info.compress_type == zipfile.ZIP_STORED for info in members}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a readable .npz archive ({e})") from None
    if "x_train" in arrays:
        train_x = _check_finite(where, arrays["x_train"])
        preprocessing = None
        y_train = _labels(where, arrays, "y_train", train_x, "x_train")
        if "x_test" in arrays:
            test_x = _check_finite(where, arrays["x_test"])
            if test_x.shape[1:] != train_x.shape[1:]:
                raise DataError(f"{where}: x_test rows {test_x.shape[1:]} differ from x_train rows {train_x.shape[1:]}")
            return Dataset(where.name, train_x, test_x, preprocessing, y_train, _labels(where, arrays, "y_test", test_x, "x_test"))
        return _split_off_test(where.name, train_x, y_train, config, preprocessing, contiguous=stored["x_train"])
    if "x" not in arrays:
        raise DataError(f"{where}: expected an array named 'x' or 'x_train', found {sorted(arrays)}")
    x = _check_finite(where, arrays["x"])
    return _split_off_test(where.name, x, _labels(where, arrays, "y", x, "x"), config, None, contiguous=stored["x"])


def _labels(where: Path | RemoteFile, arrays: dict[str, np.ndarray], key: str, x: np.ndarray, x_key: str) -> np.ndarray | None:
    """The .npz member ``key`` as labels (n,) int64 in memory, one per row of ``x`` (member ``x_key``), or None when
    there is none. Labels (n,) or (n, 1) are class numbers: integers, or floats holding whole numbers; anything else is
    an error that names the first row (0-based, as the finite check counts rows) that is not one."""
    if key not in arrays:
        return None
    y = np.asarray(arrays[key])
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels (n, 1), as scikit-learn's ravel() would take it
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: {key} has {len(y) if y.ndim else 0} label(s) for the {len(x)} row(s) of {x_key}; "
                        f"expected one label per row, shape ({len(x)},), got {y.shape}")
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    whole = np.zeros(len(y), bool)
    if y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(y) & (np.floor(y) == y) & (np.abs(y) < 2.0**63)
    if not whole.all():
        row = int(np.argmin(whole))
        raise DataError(f"{where}: {key} row {row} holds {y[row].item()!r} ({y.dtype}), which is not a whole number; labels "
                        f"must be integers (class numbers): map other values to numbers first, e.g. np.unique(y, return_inverse=True)[1]")
    return y.astype(np.int64)


def load_csv(config: DataConfig) -> Dataset:
    """A CSV of numbers, one example per row, no header."""
    path = _require_file(config)
    rows: list[list[float]] = []
    with path.open("r", newline="") as f:
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
    x = _check_finite(path, np.asarray(rows, dtype=np.float64))  # float32 once checked: a value such as 1e300 is refused
    return _split_off_test(path.name, x, None, config, None)


# --- tables ------------------------------------------------------------------------

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
CSV_BLOCK_BYTES = 8 * 2**20  # CSV text parsed per batch (pyarrow's block; one row must fit in it)


def _is_parquet(path: Path | RemoteFile) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


class _Table:
    """A table with a header row, read batch by batch so that one batch at a time is held besides what is kept of it:
    Parquet row group by row group, CSV (delimiter sniffed among , ; tab |; quoting; a UTF-8 BOM) CSV_BLOCK_BYTES at a
    time. Every CSV column is read as text and made a number here: pyarrow's streaming reader would infer a column's
    type from the first block alone and fail on a later block that disagrees. From a URL the same, over an fsspec
    file: sequential reads for CSV, Parquet's footer and then each row group's column chunks by range requests."""

    def __init__(self, path: Path | RemoteFile) -> None:
        import pyarrow as pa

        self.path = path
        self.delimiter = ""
        self.types: dict[str, pa.DataType] = {}  # Parquet's column types; a CSV's columns are all read as text
        try:
            if _is_parquet(path):
                import pyarrow.parquet as pq

                with _opened(path) as source:
                    schema = pq.ParquetFile(source).schema_arrow
                self.names, self.types = schema.names, dict(zip(schema.names, schema.types, strict=True))
            else:
                self.names = self._csv_header()
        except (pa.ArrowException, OSError) as e:
            kind = "Parquet file" if _is_parquet(path) else "table"
            raise DataError(f"{path}: not a readable {kind} ({str(e).splitlines()[0]})") from None
        repeated = next((name for i, name in enumerate(self.names) if name in self.names[:i]), None)
        if repeated is not None:
            places = [str(i + 1) for i, name in enumerate(self.names) if name == repeated]
            raise DataError(f"{path}: the {'schema' if _is_parquet(path) else 'header'} names column {repeated!r} "
                            f"{len(places)} times (columns {', '.join(places)}); give each column its own name")

    def nested(self, columns: list[str]) -> None:
        """Refuse a column of ``columns`` that holds lists, structs, maps or unions: neither numbers nor text."""
        import pyarrow as pa

        for name in columns:
            if name in self.types and pa.types.is_nested(self.types[name]):
                raise DataError(f"{self.path}: column {name!r} holds {self.types[name]} values (lists, structs or maps); a table's "
                                f"columns must hold numbers or text: leave it out with data.exclude or data.columns")

    def _csv_header(self) -> list[str]:
        import csv

        with _open(self.path, HEADER_BYTES) as f:
            head = f.read(65536)
            while b"\n" not in head and len(head) < CSV_BLOCK_BYTES:  # a header line longer than the first read
                more = f.read(65536)
                if not more:
                    break
                head += more
        try:
            first = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: line 1 is not UTF-8 text (byte {e.start + 1}: {e.object[e.start:e.end]!r}); "
                            f"save the file as UTF-8") from None
        try:
            self.delimiter = "\t" if self.path.suffix.lower() == ".tsv" else csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter
        except csv.Error:
            self.delimiter = ","
        return next(csv.reader([first], delimiter=self.delimiter), [])

    def batches(self, columns: list[str]):
        """The table's rows in order, in batches (pyarrow tables or record batches) of ``columns``."""
        import pyarrow as pa
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        try:
            with _opened(self.path) as source:
                if _is_parquet(self.path):
                    parquet = pq.ParquetFile(source)
                    for group in range(parquet.num_row_groups):
                        yield parquet.read_row_group(group, columns=columns)
                    return
                yield from pa_csv.open_csv(
                    source, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                    parse_options=pa_csv.ParseOptions(delimiter=self.delimiter),
                    convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()), include_columns=columns,
                                                          strings_can_be_null=True, quoted_strings_can_be_null=True))
        except (pa.ArrowException, OSError) as e:
            if not _is_parquet(self.path) and "columns, got" in str(e):
                _raise_ragged_line(self.path, self.delimiter)
            if not _is_parquet(self.path) and "invalid UTF8" in str(e):
                _raise_not_utf8_line(self.path, self.delimiter, columns)
                raise DataError(f"{self.path}: not UTF-8 text ({str(e).splitlines()[0]}); save the file as UTF-8") from None
            raise DataError(f"{self.path}: not a readable table ({str(e).splitlines()[0]})") from None


def _raise_ragged_line(path: Path | RemoteFile, delimiter: str) -> None:
    """Name the first line whose field count differs from the header's (pyarrow's message names none)."""
    import csv

    with path.open("r", newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader)
        for fields in reader:
            if fields and len(fields) != len(header):
                raise DataError(f"{path}: line {reader.line_num} has {len(fields)} fields, the header {len(header)} "
                                f"({delimiter!r}-separated; quote a field that holds {delimiter!r})")


def _raise_not_utf8_line(path: Path | RemoteFile, delimiter: str, columns: list[str]) -> None:
    """Name the first line and column of ``columns`` whose bytes are not UTF-8 (pyarrow's message names neither)."""
    import csv

    with path.open("r", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader)
        used = [i for i, name in enumerate(header) if name in columns]
        for fields in reader:
            for i in used:
                text = fields[i] if i < len(fields) else ""
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # the bytes that did not decode, kept as lone surrogates
                    raise DataError(f"{path}: line {reader.line_num}, column {header[i]!r}: the text "
                                    f"{text.encode('utf-8', 'surrogateescape')[:40]!r} is not UTF-8; save the file as UTF-8") from None


def _where(path: Path | RemoteFile, row: int) -> str:
    """A row (0-based, of the data) as an editor shows it: CSV line numbers count the header line."""
    return f"{path}: line {row + 2}" if not _is_parquet(path) else f"{path}: row {row + 1}"


def _texts(path: Path | RemoteFile, name: str, column):
    """A column of a batch as text (pyarrow strings), or a DataError naming the column when its type has no text."""
    import pyarrow as pa

    try:
        return column.cast(pa.string())
    except pa.ArrowException as e:
        raise DataError(f"{path}: column {name!r}: its {column.type} values cannot be read as numbers or text "
                        f"({str(e).splitlines()[0]})") from None


def _numbers(path: Path | RemoteFile, first: int, name: str, column) -> np.ndarray:
    """A feature column of a batch whose first row is ``first``, as float64 with NaN where the field is empty.

    Text is read as numbers by pyarrow's parser, and where it refuses a field (" 2") by Python's float; a field
    neither reads is an error naming its line.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    texts = _texts(path, name, column)  # as before, a type that is neither number nor text (bool, date) goes by its text
    try:
        return np.asarray(pc.cast(texts, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowInvalid:
        pass
    values = np.empty(len(texts), np.float64)
    for row, text in enumerate(texts.to_pylist()):
        try:
            values[row] = float(text if text is not None else "nan")
        except ValueError:
            raise DataError(f"{_where(path, first + row)}, column {name!r}: {text!r} is not a number; "
                            f"list the column in data.categorical if it holds categories") from None
    return values


def load_table(config: DataConfig) -> Dataset:
    """A table with a header row: numeric features as they are, `categorical` ones one-hot, `label` kept apart.

    Read batch by batch (``_Table``): what is held is one batch plus, per kept row, the features as float32 (float64
    with ``missing = "median"``, whose medians need the exact values) and a category number per categorical column.
    """
    path = _require_file(config)
    table = _Table(path)
    names = table.names
    wanted = [config.label] if config.label else []
    for key in ("columns", "exclude", "categorical"):
        wanted += list(getattr(config, key))
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise DataError(f"{path}: no column(s) {unknown}; the header names {names}")
    features = list(config.columns) or [n for n in names if n != config.label and n not in config.exclude]
    if config.label in features:
        raise DataError(f"{path}: data.label {config.label!r} is also a feature; leave it out of data.columns")
    if not features:
        raise DataError(f"{path}: no feature columns left (the header names {names})")
    used = features + ([config.label] if config.label else [])
    table.nested(used)
    numeric = [n for n in features if n not in config.categorical]
    coded = [n for n in used if n in config.categorical or n == config.label]
    dtype = np.float64 if config.missing == "median" else np.float32
    values: dict[str, list[np.ndarray]] = {name: [] for name in numeric}
    codes: dict[str, tuple[list[np.ndarray], dict[str, int]]] = {name: ([], {}) for name in coded}  # numbers in order seen
    first = kept = 0
    for batch in table.batches(used):
        nulls = np.zeros(batch.num_rows, bool)
        for name in used:
            column_nulls = batch.column(name).is_null().to_numpy(zero_copy_only=False)
            if column_nulls.any() and config.missing == "error":
                row = first + int(np.argmax(column_nulls))
                raise DataError(f"{_where(path, row)}, column {name!r}: the field is empty or NA; set data.missing = 'drop' or 'median'")
            if name == config.label or config.missing == "drop" or name in config.categorical:
                nulls |= column_nulls
        keep = np.flatnonzero(~nulls)
        for name in numeric:
            column = _numbers(path, first, name, batch.column(name))[keep]
            infinite = np.isinf(column) if config.missing == "median" else ~np.isfinite(column)  # NaN: filled in below
            beyond = _beyond_float32(column)  # the features are float32 in the end, whatever they are held as here
            if infinite.any() or beyond.any():
                at = int(np.argmax(infinite | beyond))
                problem = "the value is not finite" if infinite[at] else f"{float(column[at])!r} is beyond float32's range (±{FLOAT32_MAX:.2g})"
                raise DataError(f"{_where(path, first + int(keep[at]))}, column {name!r}: {problem}")
            values[name].append(column.astype(dtype))
        for name in coded:
            seen, numbers = codes[name]
            texts = np.asarray(_texts(path, name, batch.column(name)).to_pylist(), dtype=object)[keep]
            seen.append(np.fromiter((numbers.setdefault(text, len(numbers)) for text in texts), np.int64, len(texts)))
        first, kept = first + batch.num_rows, kept + len(keep)
    if kept < 2:
        raise DataError(f"{path}: {kept} usable row(s); at least 2 are needed")
    sorted_codes = {}  # per coded column: (its values sorted, each row's index among them)
    for name, (seen, numbers) in codes.items():
        categories = sorted(numbers)
        position = {text: i for i, text in enumerate(categories)}
        rank = np.fromiter((position[text] for text in numbers), np.int64, len(numbers))  # in the order numbers were given
        sorted_codes[name] = (categories, rank[np.concatenate(seen)])
    widths = [len(sorted_codes[n][0]) if n in config.categorical else 1 for n in features]
    x = np.zeros((kept, sum(widths)), np.float32)
    described, start = [], 0
    for name, width in zip(features, widths, strict=True):
        if name in config.categorical:
            categories, index = sorted_codes[name]
            x[np.arange(kept), start + index] = 1.0
            described.append({"name": name, "type": "category", "categories": categories})
        else:
            column = np.concatenate(values.pop(name))
            if config.missing == "median":
                present = column[~np.isnan(column)]
                column = np.where(np.isnan(column), float(np.median(present)) if len(present) else 0.0, column)
            x[:, start] = column
            described.append({"name": name, "type": "number"})
        start += width
    y = sorted_codes[config.label][1] if config.label else None
    dataset = _split_off_test(path.name, x, y, config, None)
    dataset.features = described
    return dataset


# --- image folders -------------------------------------------------------------------

def _visible(name: str) -> bool:
    return not name.startswith(".")


def _child(folder: Path | RemoteFile, relative: str) -> Path | RemoteFile:
    return folder / relative if isinstance(folder, Path) else folder.child(relative)


def _listing(folder: Path | RemoteFile) -> tuple[list[str], list[str]]:
    """(every file under ``folder`` as a path relative to it, the names of its visible subfolders)."""
    if isinstance(folder, Path):
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p.name))
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()], subfolders
    root = folder.path + "/"
    try:
        files = [p[len(root):] for p in folder.fs.find(folder.path) if p.startswith(root)]  # one listing, however deep
    except OSError as e:
        raise DataError(f"{folder}: cannot be listed ({e})") from None
    # Object storage has no folders, only names with slashes: a subfolder is the first part of a longer name.
    return files, sorted({f.split("/", 1)[0] for f in files if "/" in f and _visible(f.split("/", 1)[0])})


def _image_files(folder: Path | RemoteFile) -> tuple[list[str], list[int] | None, list[str]]:
    """(image files relative to the folder, label index per file or None, label names): one subfolder per label, or a
    flat folder without labels.

    Hidden files and files whose suffix is not an image's are left out; a label subfolder is searched to any depth.
    """
    files, subfolders = _listing(folder)
    images = sorted((f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES and all(_visible(part) for part in f.split("/"))),
                    key=lambda f: f.split("/"))  # folder by folder, as paths sort
    loose = [f for f in images if "/" not in f]
    if not subfolders:
        return loose, None, []
    if loose:
        raise DataError(f"{folder}: holds both image files ({loose[0]}, ...) and subfolders ({subfolders[0]}, ...); "
                        "put every image in a subfolder named after its label, or use a flat folder without subfolders")
    files, labels = [], []
    for index, subfolder in enumerate(subfolders):
        found = [f for f in images if f.startswith(subfolder + "/")]
        if not found:
            raise DataError(f"{_child(folder, subfolder)}: the label folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [index] * len(found)
    return files, labels, subfolders


# Images per task of a decoding pass: what one worker process decodes at a time (training: one batch per task), and
# from a URL the files fetched together (concurrently, where the store allows).
IMAGE_BATCH = 64
# data.decode = "auto": a folder whose pixels take at most this many bytes (uint8, counted as three channels unless
# data.channels is 1) is decoded once into memory, a bigger one lazily, each batch as training draws it.
IMAGE_MEMORY_BYTES = 2**28


def decoding_workers(workers: int) -> int:
    """data.workers, at most the CPUs this process may run on; 0 in a daemonic process, which may not start any."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(workers, cpus)


@dataclass(frozen=True)
class _Failed:
    """A task's DataError, passed back from a worker process as a value (DataLoader would re-raise it reworded)."""

    message: str


class _Tasks(torch.utils.data.Dataset):
    """Task k, ``work(args[k])``, as a map-style dataset, so that a DataLoader runs the tasks in its worker processes."""

    def __init__(self, work: Callable[[Any], Any], args: list[Any]) -> None:
        self.work, self.args = work, args

    def __len__(self) -> int:
        return len(self.args)

    def __getitem__(self, k: int) -> Any:
        try:
            return self.work(self.args[k])
        except DataError as e:
            return _Failed(str(e))


def _as_is(item: Any) -> Any:
    return item


def _in_parallel(work: Callable[[Any], Any], args: list[Any], workers: int) -> Iterator[Any]:
    """work(a) for each of ``args`` in that order, whatever the number of workers: computed by ``workers`` DataLoader
    worker processes, each up to two tasks ahead of what is taken (DataLoader's prefetch), or here one by one when
    ``workers`` is 0 or there is a single task. A task's DataError is raised here, worded as the task worded it.
    ``work`` must be picklable (a bound method of a dataclass, a partial of one) where processes are spawned."""
    if workers == 0 or len(args) <= 1:
        yield from map(work, args)
        return
    iterator = iter(torch.utils.data.DataLoader(_Tasks(work, args), batch_size=None, num_workers=min(workers, len(args)), collate_fn=_as_is))
    try:
        for result in iterator:
            if isinstance(result, _Failed):
                raise DataError(result.message)
            yield result
    finally:  # also when the consumer stops early (a bad file, an exception in training): no worker outlives the pass
        iterator._shutdown_workers()


def _image_sources(folder: Path | RemoteFile, files: list[str]) -> Iterator[Path | bytes]:
    """What to decode for each file, in order: a local file's path, or a URL's bytes, fetched IMAGE_BATCH files at a
    time (concurrently where the store allows) as decoding reaches them."""
    if isinstance(folder, Path):
        yield from (folder / f for f in files)
        return
    for start in range(0, len(files), IMAGE_BATCH):
        batch = [folder.child(f) for f in files[start:start + IMAGE_BATCH]]
        fetched = folder.fs.cat([file.path for file in batch], on_error="return")
        for file in batch:
            content = fetched.get(file.path)
            if not isinstance(content, bytes):
                raise DataError(f"{file}: cannot be read ({content})")
            yield content


@dataclass(frozen=True)
class _ImageReader:
    """What decoding a folder's files takes, picklable for worker processes: a URL's filesystem is made again in each
    process (fsspec's async filesystems do not survive a fork)."""

    path: str  # data.path
    files: tuple[str, ...]  # relative to the folder, in the folder's order
    size: tuple[int, int]
    config_channels: int  # data.channels (0: by the images)
    channels: int  # of the arrays: 1 or 3 (the lazy path; the in-memory one decides once every image is decoded)
    skip_bad: bool

    def folder(self) -> Path | RemoteFile:
        return location(self.path)

    def unreadable(self, file: str, reason: Exception | str) -> DataError:
        advice = ("it was readable before training, so it changed since" if self.skip_bad else
                  "set data.skip_bad = true to skip such files")
        return DataError(f"{_child(self.folder(), file)}: not a readable image ({reason}); {advice}")

    def pixels(self, image) -> np.ndarray:
        """The rule's pixels: (H, W) for one channel, (3, H, W) for three. With data.channels = 0 a gray image is
        converted to one channel (and a colour one too where the arrays have one)."""
        gray = self.channels == 1 or is_gray(image)
        return to_pixels(image, self.size, self.config_channels or (1 if gray else 3))

    def _sources(self, files: list[str]) -> Iterator[tuple[str, Path | bytes]]:
        return zip(files, _image_sources(self.folder(), files), strict=True)

    def decode(self, numbers: np.ndarray) -> torch.Tensor:
        """uint8 pixels (k, *input_shape) of files ``numbers``, as a tensor: from a worker through shared memory."""
        files = [self.files[n] for n in numbers]
        out = np.empty((len(files), *image_input_shape(self.size, self.channels)), np.uint8)
        for row, (file, source) in enumerate(self._sources(files)):
            try:
                image = open_image(source)
            except (OSError, ValueError, SyntaxError) as e:
                raise self.unreadable(file, e) from None
            pixels = self.pixels(image)
            out[row] = pixels if pixels.ndim == out.ndim - 1 else pixels[None]  # a gray image among colour ones: repeated
        return torch.from_numpy(out)

    def decode_each(self, start: int) -> list[np.ndarray | str]:
        """Per file of files[start:start + IMAGE_BATCH] its pixels, each with its own channels (``channels = 3`` here:
        gray ones keep one), or with skip_bad the note of why it is skipped."""
        out = []
        for file, source in self._sources(list(self.files[start:start + IMAGE_BATCH])):
            try:
                out.append(self.pixels(open_image(source)))
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise self.unreadable(file, e) from None
                out.append(f"{file} ({e})")
        return out

    def scan(self, start: int, decode: bool) -> list[tuple[str, bool] | str]:
        """Per file of files[start:start + IMAGE_BATCH]: (the sha256 of its bytes, whether its mode is gray), or with
        skip_bad the note of why it is skipped. Its header alone is parsed, or with ``decode`` the whole image decoded."""
        from PIL import Image

        out = []
        for file, source in self._sources(list(self.files[start:start + IMAGE_BATCH])):
            try:
                data = source if isinstance(source, bytes) else source.read_bytes()
                # Image.open parses the header; a palette is read with it (is_gray looks at its entries).
                image = open_image(data) if decode else Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
                gray = not self.config_channels and is_gray(image)
            except (OSError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise self.unreadable(file, e) from None
                out.append(f"{file} ({e})")
                continue
            out.append((hashlib.sha256(data).hexdigest(), gray))
        return out


class ImageFiles:
    """The images of a folder as an array (n, *input_shape) of uint8 pixels, decoded as they are indexed: what np.memmap
    is for an .npy. The rows are files; nothing of an image is held before it is indexed.

    ``x[i]``, ``x[a:b]`` and ``x[rows]`` decode those files by the rule of ``models/images.py``, IMAGE_BATCH per task
    in DataLoader worker processes when there are more. ``x.rows(index)`` is a view that decodes nothing (the split,
    data.limit). ``x.batches(lists)`` gives the pixels of each list of rows in turn, one batch per task, the workers
    decoding ahead of the consumer: how training draws its batches.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, reader: _ImageReader, digests: dict[int, str], workers: int, numbers: np.ndarray) -> None:
        self.reader, self.digests, self.workers = reader, digests, workers
        self.numbers = np.asarray(numbers, dtype=np.int64)  # row -> file number (of reader.files)

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *image_input_shape(self.reader.size, self.reader.channels))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    @property
    def files(self) -> list[str]:
        """The rows' files, relative to the folder."""
        return [self.reader.files[n] for n in self.numbers]

    def rows(self, key) -> ImageFiles:
        """The rows ``key`` (a slice or row numbers) of these, decoding nothing."""
        return ImageFiles(self.reader, self.digests, self.workers, self.numbers[key])

    def identity(self) -> str:
        """Names these rows for the data fingerprint: each file's path in the folder and the sha256 of its bytes, read
        before training (hashing the pixels would decode every image once more)."""
        h = hashlib.sha256()
        for n in self.numbers:
            h.update(f"{self.reader.files[n]}\0{self.digests[n]}\n".encode())
        return h.hexdigest()

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self[np.array([key])][0]
        numbers = self.numbers[key.numpy() if isinstance(key, torch.Tensor) else key]
        tasks = [numbers[start:start + IMAGE_BATCH] for start in range(0, len(numbers), IMAGE_BATCH)]
        out = np.empty((len(numbers), *self.shape[1:]), np.uint8)
        with closing(_in_parallel(self.reader.decode, tasks, self.workers)) as decoded:
            for start, pixels in zip(range(0, len(numbers), IMAGE_BATCH), decoded, strict=True):
                out[start:start + len(pixels)] = pixels.numpy()
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[:]
        return x if dtype is None else x.astype(dtype)

    def batches(self, row_lists: list[np.ndarray]) -> Iterator[np.ndarray]:
        """self[rows] for each of ``row_lists`` in turn, each decoded whole by one worker, the workers ahead of the consumer."""
        numbers = [self.numbers[np.asarray(rows)] for rows in row_lists]
        with closing(_in_parallel(self.reader.decode, numbers, self.workers)) as decoded:
            for pixels in decoded:
                yield pixels.numpy()


def _image_folder(config: DataConfig) -> Path | RemoteFile:
    if not config.path:
        raise DataError("data.source 'images' needs data.path (a folder of images)")
    folder = location(config.path)
    kind = kind_of(folder)
    if kind == "file":
        raise DataError(f"{folder}: is a file; data.source 'images' needs a folder of images (one subfolder per label, or flat)")
    if kind != "directory":
        raise DataError(f"{folder}: folder not found")
    return folder


def load_images(config: DataConfig) -> Dataset:
    """A folder of PNG, JPEG, WebP or BMP files (``models/images.py`` has the resize and colour rule).

    Arrays are uint8 (n, H, W) for one channel and (n, 3, H, W) for three; pixels 0..255 scaled by 1/255 unless
    ``data.scaling`` says otherwise. The folder may be a URL: listed once, each file's bytes read when it is needed.

    ``data.decode``: ``memory`` decodes every image once, before training, into one array. ``lazy`` reads every file
    once before training (its bytes hashed for the fingerprint and its header parsed for its colour mode; with
    ``data.skip_bad`` decoded whole, so that the unreadable ones are known and counted before training) and gives
    training an ImageFiles, whose batches are decoded as they are drawn. ``auto``: memory up to IMAGE_MEMORY_BYTES of
    pixels. Either pass is spread over ``data.workers`` DataLoader worker processes; the rows, their order, the split
    and the pixels are the same whichever way and however many workers.
    """
    folder = _image_folder(config)
    files, labels, names = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: no images found (files ending {', '.join(IMAGE_SUFFIXES)}, in the folder or in label subfolders)")
    workers = decoding_workers(config.workers)
    size = tuple(config.image_size) or _first_size(folder, files, config.skip_bad)
    reader = _ImageReader(config.path, tuple(files), size, config.channels, config.channels or 3, config.skip_bad)
    pixels_bound = len(files) * size[0] * size[1] * (config.channels or 3)
    if config.decode == "lazy" or (config.decode == "auto" and pixels_bound > IMAGE_MEMORY_BYTES):
        x, kept, skipped = _scanned(reader, workers)
    else:
        x, kept, skipped = _decoded(reader, workers)
    if skipped:
        print(f"note: skipped {len(skipped)} unreadable image(s) of {len(files)} in {folder} (data.skip_bad): "
              f"{'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if len(x) < 2:
        raise DataError(f"{folder}: {len(x)} readable image(s); at least 2 are needed")
    y = None if labels is None else np.asarray(labels, dtype=np.int64)[kept]
    # Split at random (seeded) whichever way the images are held: a folder's files are in label order.
    dataset = _split_off_test(folder.name, x, y, config, Preprocessing(input_shape=x.shape[1:], offset=0.0, scale=1 / 255), contiguous=False)
    dataset.facts = {**({"labels": names} if names else {}), "image_size": list(size), "channels": x.shape[1] if x.ndim == 4 else 1,
                     "files": len(x), "skipped_files": len(skipped)}
    return dataset


def _first_size(folder: Path | RemoteFile, files: list[str], skip_bad: bool) -> tuple[int, int]:
    """(height, width) of the first readable image in the folder's order: the default data.image_size."""
    for file, source in zip(files, _image_sources(folder, files), strict=True):
        try:
            image = open_image(source)
        except (OSError, ValueError, SyntaxError) as e:
            if not skip_bad:
                raise DataError(f"{_child(folder, file)}: not a readable image ({e}); set data.skip_bad = true to skip such files") from None
            continue  # found again, and counted, by the pass over every file
        return image.height, image.width
    raise DataError(f"{folder}: 0 readable image(s); at least 2 are needed")


def _decoded(reader: _ImageReader, workers: int) -> tuple[np.ndarray, list[int], list[str]]:
    """(every readable image's pixels in one array, their file numbers, notes of the unreadable ones skipped).

    Gray images stay one channel until a colour one shows up; then they are repeated to three.
    """
    pixels, kept, skipped = [], [], []
    starts = list(range(0, len(reader.files), IMAGE_BATCH))
    with closing(_in_parallel(reader.decode_each, starts, workers)) as decoded:
        batches = list(zip(starts, decoded, strict=True))
    for start, results in batches:
        for number, result in enumerate(results, start):
            if isinstance(result, str):
                skipped.append(result)
            else:
                pixels.append(result)
                kept.append(number)
    channels = reader.config_channels or (3 if any(p.ndim == 3 for p in pixels) else 1)
    x = np.empty((len(pixels), *image_input_shape(reader.size, channels)), dtype=np.uint8)
    for row, p in enumerate(pixels):
        x[row] = p if p.ndim == x.ndim - 1 else p[None]  # a gray image among colour ones: its one channel three times
    return x, kept, skipped


def _scanned(reader: _ImageReader, workers: int) -> tuple[ImageFiles, list[int], list[str]]:
    """(the readable images as an ImageFiles, their file numbers, notes of the unreadable ones skipped), from one pass
    over the files: each read and hashed, its header parsed (decoded whole with skip_bad)."""
    digests, grays, kept, skipped = {}, [], [], []
    starts = list(range(0, len(reader.files), IMAGE_BATCH))
    with closing(_in_parallel(partial(reader.scan, decode=reader.skip_bad), starts, workers)) as scanned:
        batches = list(zip(starts, scanned, strict=True))
    for start, results in batches:
        for number, result in enumerate(results, start):
            if isinstance(result, str):
                skipped.append(result)
            else:
                digests[number] = result[0]
                grays.append(result[1])
                kept.append(number)
    channels = reader.config_channels or (1 if all(grays) else 3)
    reader = replace(reader, channels=channels)
    return ImageFiles(reader, digests, workers, np.asarray(kept, dtype=np.int64)), kept, skipped


SOURCES: dict[str, Callable[[DataConfig], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "npy": load_npy,
    "npz": load_npz,
    "csv": load_csv,
    "table": load_table,
    "images": load_images,
}
Source = Literal[tuple(SOURCES)]  # data.source: one of the loaders above


def load_dataset(config: DataConfig) -> Dataset:
    """The source's data, limited, with its preprocessing fitted on the training split where the source has none of
    its own (Fashion-MNIST and digits know their pixel range) or ``data.scaling`` asks for one."""
    dataset = SOURCES[config.source](config)
    if config.limit:
        dataset.train_x = _take(dataset.train_x, slice(0, config.limit))
        dataset.train_y = None if dataset.train_y is None else dataset.train_y[: config.limit]
    if dataset.preprocessing is None or config.scaling != "auto":
        dataset.preprocessing = fit_scaling(config.path or dataset.name, dataset.train_x, config.resolved_scaling)
    return dataset
