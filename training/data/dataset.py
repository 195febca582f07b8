"""What every source gives: a Dataset of raw arrays, read in chunks, split into training and test rows.

Every loader returns raw arrays; the preprocessing that maps them to the model's space (``data.scaling``) is fitted
on the training split, goes into the version and is applied again when serving. Problems with a file raise
DataError naming the file, and for tables the line as an editor shows it and the column by name.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aeserve.models.preprocessing import Preprocessing
from aeserve.training.data.config import DataConfig


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


# --- reading arrays in chunks -------------------------------------------------------

CHUNK_ROWS = 8192  # rows per pass of the finite check, the scaling fit and the fingerprint
RELEASE_BYTES = 64 * 2**20  # after reading this much of a memory-mapped array in order, its pages leave the resident set


def release_pages(x: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set (a no-op for arrays in memory).

    Pages of a read-only file mapping count as resident once touched; without this a pass over a 4 GB file shows as
    4 GB of RSS. They stay in the kernel's page cache, so reading them again is cheap.
    """
    mapping = getattr(x, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class FileRows:
    """Rows of a memory-mapped array read at random with ``os.pread``, not through the mapping.

    A row read through a file mapping maps far more than its bytes: the kernel maps the page cache's large folios
    (up to 2 MB) whole, and the pages around a faulting one, so 256 rows drawn at random from a 1 GB file map some
    400 MB into the resident set. Read with pread, the rows land in the batch and the file's pages stay in the page
    cache only. ``of(x)`` is None where x is not a memory map whose rows lie whole one after another in its file.
    """

    def __init__(self, path: str, first: int, row_bytes: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.first, self.row_bytes, self.shape, self.dtype = path, first, row_bytes, shape, dtype
        self._fd: int | None = None

    @classmethod
    def of(cls, x: np.ndarray) -> FileRows | None:
        mapping = getattr(x, "_mmap", None)
        if not isinstance(x, np.memmap) or not isinstance(mapping, mmap.mmap) or not getattr(x, "filename", None) or x.ndim < 1:
            return None
        row_bytes = x.dtype.itemsize * math.prod(x.shape[1:])
        if not x[:1].flags.c_contiguous or x.strides[0] != row_bytes:
            return None  # rows not stored whole and in order (a column slice, a step, Fortran order)
        start = x.offset - x.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap began its mapping in the file
        mapped_at = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        return cls(x.filename, start + (x.ctypes.data - mapped_at), row_bytes, tuple(x.shape[1:]), x.dtype)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(rows), *self.shape), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for i, row in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
            got = os.preadv(self._fd, [view[i * self.row_bytes:(i + 1) * self.row_bytes]], self.first + row * self.row_bytes)
            if got != self.row_bytes:
                raise DataError(f"{self.path}: row {row} could not be read whole (the file is shorter than its header says)")
        return out

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


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


class RowsOnDemand(ABC):
    """An array (n, ...) whose rows are read from their files as they are indexed, as np.memmap's are: an .npy at a
    URL (RemoteArray) or an image folder decoded lazily (ImageFiles). ``x[rows]`` is an ndarray of those rows."""

    @abstractmethod
    def identity(self) -> str:
        """Names these rows for the data fingerprint without reading them all."""

    @abstractmethod
    def take(self, rows: slice | np.ndarray) -> RowsOnDemand | np.ndarray:
        """The rows the split and data.limit keep: a view that reads nothing where this array can hold one."""


def is_lazy(x) -> bool:
    """Whether rows of x are read from a file as they are indexed (memory-mapped, from a URL, images decoded lazily)."""
    return isinstance(x, np.memmap | RowsOnDemand)


def take(x, rows: slice | np.ndarray):
    """x[rows]; for an array read on demand, a view that reads nothing where it can hold one (as a memory map's slice is)."""
    return x.take(rows) if isinstance(x, RowsOnDemand) else x[rows]


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
            if isinstance(a, RowsOnDemand):
                h.update(a.identity().encode())
                continue
            for chunk in chunks(a):  # row-major bytes chunk by chunk: the same digest as the whole array's bytes
                h.update(np.ascontiguousarray(chunk).tobytes())
        return h.hexdigest()


def split_off_test(name: str, x: np.ndarray, y: np.ndarray | None, config: DataConfig, preprocessing: Preprocessing | None,
                   contiguous: bool | None = None) -> Dataset:
    """Hold out a seeded ``test_fraction`` of the examples as the test split.

    A memory-mapped array is split without a copy: its last ``test_fraction`` rows are the test split and the rows
    before them the training split (views of the file). Shuffle such a file's rows once if they are ordered (by
    label, by time). Arrays in memory get a seeded random split. ``contiguous`` (default: whether x is read from its
    file on demand) says which: an array that a URL gave whole is split as the same local file would be.
    """
    n_test = max(1, int(round(len(x) * config.test_fraction))) if config.test_fraction > 0 else 0
    if is_lazy(x) if contiguous is None else contiguous:
        train, test = slice(0, len(x) - n_test), slice(len(x) - n_test, len(x))
    else:
        order = np.random.default_rng(12345).permutation(len(x))
        test, train = order[:n_test], order[n_test:]
    test_y, train_y = (None, None) if y is None else (y[test], y[train])
    return Dataset(name, take(x, train), take(x, test), preprocessing, train_y, test_y)
