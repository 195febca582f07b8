"""Arrays: .npy files and .npz archives, local (memory-mapped) or at a URL (read rows on demand, RemoteArray).

No source needs the whole data set in memory: a local array is memory-mapped, an .npy at a URL bigger than
REMOTE_WHOLE_BYTES stays in the store and its rows are fetched by range requests as training draws them.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from aeserve.models.npy import FLOAT32_MAX, read_header
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import CHUNK_ROWS, DataError, Dataset, RowsOnDemand, chunks, is_lazy, split_off_test
from aeserve.training.data.locations import HEADER_BYTES, RemoteFile, open_file, opened, require_file

# An array from a URL of up to this many bytes is read whole into memory: training reads rows in a new random order
# every epoch, and from object storage every read is a round trip. A bigger one is read rows on demand (RemoteArray).
REMOTE_WHOLE_BYTES = 256 * 2**20
GAP_BYTES = 64 * 2**10  # rows of a gather at most this far apart are fetched as one range: cheaper than another request


class RemoteArray(RowsOnDemand):
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

    def take(self, rows: slice | np.ndarray) -> RemoteArray | np.ndarray:
        """A slice as a view that reads nothing; other rows are read now."""
        return self.rows(rows.start, rows.stop) if isinstance(rows, slice) else self[rows]

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




def beyond_float32(values: np.ndarray) -> np.ndarray:
    """Where ``values`` are finite but become infinite as float32 (a float64 such as 1e300)."""
    with np.errstate(over="ignore"):
        return np.isfinite(values) & np.isinf(values.astype(np.float32))


def check_finite(path: Path | RemoteFile, x: np.ndarray) -> np.ndarray:
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
        if not is_lazy(x):
            x = x.astype(np.float32, copy=False)  # float32 already (as read from a URL): no second copy
    return x



def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``read_header``, refusing a dtype of Python objects (arrays are read without pickle)."""
    header = read_header(f)
    if header is not None and header[2].hasobject:
        raise ValueError(f"Python objects in dtype {header[2]}; arrays are read without pickle")
    return header


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


def load_npy(config: DataConfig) -> Dataset:
    """An .npy array (n, ...), memory-mapped: rows are read from the file as training needs them. From a URL the same,
    through range requests (``_array_at``)."""
    where = require_file(config)
    x = check_finite(where, read_npy(where))
    return split_off_test(where.name, x, None, config, None, contiguous=True)


def read_npy(where: Path | RemoteFile) -> np.ndarray:
    """The array of an .npy file, unchecked: memory-mapped, or from a URL read as ``_array_at`` reads it."""
    try:
        if isinstance(where, Path):
            x = np.load(where, mmap_mode="r", allow_pickle=False)
        else:
            with open_file(where, HEADER_BYTES) as f:
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
    return x


def _npz_member(where: Path | RemoteFile, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npz member: memory-mapped when stored uncompressed (``np.savez``), read into memory when compressed
    (``np.savez_compressed``: a deflated member cannot be mapped, so it must fit in memory). From a URL a stored member
    is read as an .npy is (``_array_at``); a compressed one is streamed through the inflater into memory."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open_file(where, HEADER_BYTES) as f:
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


def load_npz(config: DataConfig) -> Dataset:
    """An .npz with ``x`` (or ``x_train``, optionally ``x_test``) and optional ``y``/``y_train``/``y_test``.

    Members saved uncompressed (``np.savez``) are memory-mapped; compressed ones (``np.savez_compressed``) are read
    into memory, so a bigger-than-memory array belongs in an .npy or an uncompressed .npz. An uncompressed member
    is split as an .npy is (its last rows held out), a compressed one at random.
    """
    where = require_file(config)
    arrays, stored = read_npz(where)
    if "x_train" in arrays:
        train_x = check_finite(where, arrays["x_train"])
        preprocessing = None
        y_train = _labels(where, arrays, "y_train", train_x, "x_train")
        if "x_test" in arrays:
            test_x = check_finite(where, arrays["x_test"])
            if test_x.shape[1:] != train_x.shape[1:]:
                raise DataError(f"{where}: x_test rows {test_x.shape[1:]} differ from x_train rows {train_x.shape[1:]}")
            return Dataset(where.name, train_x, test_x, preprocessing, y_train, _labels(where, arrays, "y_test", test_x, "x_test"))
        return split_off_test(where.name, train_x, y_train, config, preprocessing, contiguous=stored["x_train"])
    if "x" not in arrays:
        raise DataError(f"{where}: expected an array named 'x' or 'x_train', found {sorted(arrays)}")
    x = check_finite(where, arrays["x"])
    return split_off_test(where.name, x, _labels(where, arrays, "y", x, "x"), config, None, contiguous=stored["x"])


def read_npz(where: Path | RemoteFile) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """(an .npz's members by name, unchecked, as ``_npz_member`` reads them; whether each is stored uncompressed)."""
    try:
        with opened(where) as source, zipfile.ZipFile(source) as archive:
            members = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            arrays = {info.filename[:-4]: _npz_member(where, archive, info) for info in members}
            stored = {info.filename[:-4]: info.compress_type == zipfile.ZIP_STORED for info in members}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a readable .npz archive ({e})") from None
    return arrays, stored
