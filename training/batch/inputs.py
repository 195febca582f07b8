"""What ``aeserve encode`` reads: any source training reads, as blocks of (ids, raw rows) in the source's order.

The readers are training's (``training/data``): a table through ``Table`` batch by batch, an .npy/.npz memory-mapped
(or by range requests from a URL), an image folder decoded in worker processes by the rule serving applies. The
rows come out as the version takes them raw, (n, *input_shape) or (n, input_dim); the version's own preprocessing
scales them in the model call. A table's columns are mapped as the server maps named columns: numbers as they are,
a categorical column one-hot over the manifest's vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aeserve.models.columns import Columns, date_values
from aeserve.models.images import size_and_channels
from aeserve.models.version import ModelVersion
from aeserve.training.batch.output import numbers_array
from aeserve.training.data.arrays import read_npy, read_npz
from aeserve.training.data.dataset import DataError, chunks
from aeserve.training.data.images import IMAGE_BATCH, ImageFiles, _image_files, _ImageReader
from aeserve.training.data.locations import Found, RemoteFile, found_at, location
from aeserve.training.data.parallel import decoding_workers
from aeserve.training.data.tables import TABLE_SUFFIXES, Table

ROW_ID, PATH_ID = "row", "path"  # the id column when --id names none: a row number, or an image's relative path
BLOCK_BYTES = 16 * 2**20  # raw rows (as float32) per model call: large enough for torch, small enough to stream
MAX_BLOCK_ROWS = 65536


def block_rows(version: ModelVersion) -> int:
    """Rows per block for ``version``: BLOCK_BYTES of float32 inputs, at least 1 and at most MAX_BLOCK_ROWS."""
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * version.preprocessing.input_dim)))


@dataclass
class Block:
    """One block of the source: ids (n,) as an Arrow array, and raw rows (n, ...) as the version takes them."""

    ids: pa.Array
    rows: np.ndarray


class TableColumns:
    """A table version's named columns (the manifest's ``features``, ``models/columns.py``) -> raw rows (n, width), as
    training read them: numbers as they are, a category one-hot over its vocabulary, a date as its year and day of the
    year; a missing field filled with the column's ``fill`` and flagged in its ``indicator`` value where the version
    was trained so, else refused. Takes Arrow columns, or anything ``pa.array`` takes (pandas, numpy)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features
        self.columns = Columns(features)
        self.names, self.widths, self.width = self.columns.names, self.columns.widths, self.columns.width

    def missing(self, names: list[str]) -> list[str]:
        return [name for name in self.names if name not in names]

    def rows(self, columns: Mapping[str, Any], table: Table | None = None, first: int = 0, where: str = "the batch") -> np.ndarray:
        """(n, width) float32 from ``columns`` (name -> values), rows ``first``.. of ``table`` when they come from one
        (its errors then name the line); a DataError names the row and column of a refused, non-finite or unknown value."""
        n = len(next(iter(columns.values()))) if columns else 0
        values, missing = [], []
        for j, feature in enumerate(self.features):
            name = feature["name"]
            column = columns[name]
            column = column if isinstance(column, pa.Array | pa.ChunkedArray) else pa.array(column)
            place = partial(_place, table, first, name, where)
            nulls = column.is_null().to_numpy(zero_copy_only=False)
            refused = self.columns.refused(j, nulls)
            if refused is not None:
                raise DataError(f"{place(refused)}: the field is empty or NA; this version fills no missing "
                                f"field of {name!r} (it was trained without one there)")
            if feature["type"] == "category":
                known = list(feature["categories"])
                texts = column.cast(pa.string())
                index = pc.index_in(texts, value_set=pa.array(known, pa.string())).to_numpy(zero_copy_only=False)
                index = np.nan_to_num(index, nan=-1).astype(np.int64)  # float with NaN where a text is null or unknown
                unknown = (index < 0) & ~nulls
                if unknown.any():
                    row = int(np.argmax(unknown))
                    raise DataError(f"{place(row)}: unknown category {texts[row].as_py()!r}; this version knows {known}")
                values.append(index)
            elif feature["type"] == "date":
                values.append(table.dates(first, name, column) if table else _dates(column, place))
            else:
                values.append(table.numbers(first, name, column, "this version takes numbers there") if table else _numbers(column, place))
            missing.append(nulls)
        out = self.columns.encode(values, missing) if self.features else np.zeros((n, 0), np.float32)
        finite = np.isfinite(out)  # once for the block; a value beyond float32's range became infinite above
        if not finite.all():
            row, at = np.unravel_index(int(np.argmax(~finite)), out.shape)
            name = self.names[int(np.searchsorted(np.cumsum(self.widths), at, side="right"))]
            raise DataError(f"{_place(table, first, name, where, int(row))}: the value is not finite as float32")
        return out


def _place(table: Table | None, first: int, name: str, where: str, row: int) -> str:
    """Where a value is, for a message: a table's line (or Parquet row) and column, else the batch's row and column."""
    return table.field(first + row, name) if table else f"{where}: row {first + row}, column {name!r}"


def _dates(column: pa.Array, place) -> np.ndarray:
    """A date column not read from a table file (pandas, numpy, Arrow) as (rows, 2) year and day of the year, NaN where
    missing: Arrow dates and timestamps by their fields, text as ISO 8601 dates."""
    if pa.types.is_date(column.type) or pa.types.is_timestamp(column.type):
        return np.stack([pc.year(column).to_numpy(zero_copy_only=False).astype(np.float64),
                         pc.day_of_year(column).to_numpy(zero_copy_only=False).astype(np.float64)], axis=1)
    texts = column.cast(pa.string()).to_pylist()
    out, bad = date_values(texts)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{place(row)}: {texts[row]!r} is not a date (YYYY-MM-DD)")
    return out


def _numbers(column: pa.Array, place) -> np.ndarray:
    try:
        return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowException:
        texts = column.cast(pa.string()).to_pylist()
        for row, text in enumerate(texts):
            try:
                float(text)
            except (TypeError, ValueError):
                raise DataError(f"{place(row)}: {text!r} is not a number") from None
        raise


class Source:
    """A source read block by block: ``id_name`` and ``id_type`` name the id column, ``rows`` counts the rows where
    the source knows it before reading them (None for a CSV), ``blocks(n)`` gives Blocks of at most n rows in order."""

    id_name: str
    id_type: pa.DataType
    rows: int | None

    def blocks(self, size: int) -> Iterator[Block]:
        raise NotImplementedError


class ArraySource(Source):
    """An .npy (or an .npz member) memory-mapped or read by ranges from a URL; ids are row numbers."""

    id_name, id_type = ROW_ID, pa.int64()

    def __init__(self, where: Path | RemoteFile, x: np.ndarray, version: ModelVersion) -> None:
        self.where, self.x, self.rows = where, x, len(x)
        if x.dtype.kind not in "biuf":
            raise DataError(f"{where}: expected numbers, got dtype {x.dtype}")
        if x.ndim < 2 or math.prod(x.shape[1:]) != version.preprocessing.input_dim:
            raise DataError(f"{where}: rows of shape {list(x.shape[1:])}; {version.name}:{version.version} takes "
                            f"{list(version.input_shape)} ({version.preprocessing.input_dim} values a row)")

    def blocks(self, size: int) -> Iterator[Block]:
        for start, chunk in zip(range(0, len(self.x), size), chunks(self.x, size), strict=True):
            ids = numbers_array(np.arange(start, start + len(chunk), dtype=np.int64))
            if self.x.dtype.kind != "f":
                # Integers (pixels, mostly) as they are: the model's scaling makes them float32 in its one pass over
                # them. A copy in this thread takes the block off the file's pages without competing with the model.
                yield Block(ids, np.array(chunk))
                continue
            with np.errstate(over="ignore"):
                rows = np.asarray(chunk, dtype=np.float32)
            bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)  # a float64 beyond float32's range is infinite now
            if bad.any():
                raise DataError(f"{self.where}: row {start + int(np.argmax(bad))} holds NaN, infinite values or values beyond float32's range")
            yield Block(ids, rows)


class TableSource(Source):
    """A CSV, TSV or Parquet table read batch by batch; ids are the ``--id`` column as it is, else row numbers."""

    def __init__(self, where: Path | RemoteFile, version: ModelVersion, id_column: str | None) -> None:
        features = version.manifest.get("features")
        if not features:
            raise DataError(f"{where}: a table, but {version.name}:{version.version} was not trained on one (it has no named columns); "
                            f"give its rows as an .npy or .npz array")
        self.where, self.columns, self.id_column = where, TableColumns(features), id_column
        self.table = Table(where)
        missing = self.columns.missing(self.table.names)
        if missing:
            raise DataError(f"{where}: no column(s) {missing}, which {version.name}:{version.version} takes; the header names {self.table.names}")
        if id_column is not None and id_column not in self.table.names:
            raise DataError(f"{where}: no column {id_column!r} for --id; the header names {self.table.names}")
        self.table.nested(self.columns.names)
        self.id_name = id_column or ROW_ID
        self.id_type = pa.int64() if id_column is None else self.table.types.get(id_column, pa.string())
        self.rows = self._parquet_rows() if self.table.parquet else None

    def _parquet_rows(self) -> int:
        import pyarrow.parquet as pq

        from aeserve.training.data.locations import opened

        with opened(self.where) as source:
            return pq.ParquetFile(source).metadata.num_rows

    def blocks(self, size: int) -> Iterator[Block]:
        wanted = list(dict.fromkeys([*self.columns.names, *([self.id_column] if self.id_column else [])]))
        first = 0
        for batch in self.table.batches(wanted, missing=True):
            for start in range(0, batch.num_rows, size):
                part = batch.slice(start, size)
                rows = self.columns.rows({name: part.column(name) for name in self.columns.names}, self.table, first + start)
                if self.id_column is None:
                    ids = numbers_array(np.arange(first + start, first + start + part.num_rows, dtype=np.int64))
                else:
                    ids = part.column(self.id_column)
                    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
                    ids = ids.cast(self.id_type) if ids.type != self.id_type else ids
                yield Block(ids, rows)
            first += batch.num_rows


class ImageSource(Source):
    """An image folder (local or at a URL), each file brought to the version's size and channels by the rule serving
    applies, decoded in worker processes ahead of the model; ids are the files' paths relative to the folder."""

    id_name, id_type = PATH_ID, pa.string()

    def __init__(self, folder: Path | RemoteFile, version: ModelVersion, workers: int = 4) -> None:
        shape = tuple(version.input_shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] not in (1, 3)):
            raise DataError(f"{folder}: a folder of images, but {version.name}:{version.version} takes rows of shape {list(shape)}, "
                            f"not images ((H, W) or (channels, H, W))")
        size, channels = size_and_channels(shape)
        files, _, _ = _image_files(folder)
        if not files:
            raise DataError(f"{folder}: no images found")
        reader = _ImageReader(str(folder), tuple(files), size, channels, channels, False)
        self.images = ImageFiles(reader, {}, decoding_workers(workers), np.arange(len(files)))
        self.rows = len(files)

    def blocks(self, size: int) -> Iterator[Block]:
        size = max(IMAGE_BATCH, size // IMAGE_BATCH * IMAGE_BATCH)
        pieces = [np.arange(start, min(start + IMAGE_BATCH, self.rows)) for start in range(0, self.rows, IMAGE_BATCH)]
        files, held, done = self.images.files, [], 0
        for pixels in self.images.batches(pieces):
            held.append(pixels)
            if sum(len(p) for p in held) >= size:
                rows = np.concatenate(held).astype(np.float32)
                yield Block(pa.array(files[done:done + len(rows)], pa.string()), rows)
                done, held = done + len(rows), []
        if held:
            rows = np.concatenate(held).astype(np.float32)
            yield Block(pa.array(files[done:done + len(rows)], pa.string()), rows)


def open_source(data: str, version: ModelVersion, id_column: str | None = None) -> Source:
    """The source at ``data`` (a path or URL) read for ``version``; a DataError names what is wrong with it."""
    where = location(data)
    found = found_at(where)
    if found is Found.NOTHING:
        raise DataError(f"{where}: not found")
    if found is Found.FOLDER:
        if id_column:
            raise DataError(f"--id names a table's column; the rows of an image folder are named by their paths ({where})")
        return ImageSource(where, version)
    suffix = where.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return TableSource(where, version, id_column)
    if suffix not in (".npy", ".npz"):
        raise DataError(f"{where}: cannot tell the data's kind from the suffix {suffix!r}; --data takes a table "
                        f"({', '.join(TABLE_SUFFIXES)}), an array (.npy, .npz) or a folder of images")
    if id_column:
        raise DataError(f"--id names a table's column; the rows of an array are numbered ({where})")
    if suffix == ".npy":
        return ArraySource(where, read_npy(where), version)
    arrays, _ = read_npz(where)
    key = "x" if "x" in arrays else "x_train" if "x_train" in arrays else None
    if key is None:
        raise DataError(f"{where}: expected an array named 'x' or 'x_train', found {sorted(arrays)}")
    return ArraySource(where, arrays[key], version)
