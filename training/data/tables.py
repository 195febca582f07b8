"""Tables: CSV, TSV and Parquet files read by pyarrow batch by batch, local or at a URL.

Two sources read them: ``table`` (a header row; numeric, categorical and label columns) and ``csv`` (numbers only, no
header, one example per line). Every error names the file, the line as an editor shows it (or a Parquet row) and the
column.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from aeserve.models.columns import MISSING_TEXTS, Columns, date_values
from aeserve.models.npy import FLOAT32_MAX
from aeserve.training.data.arrays import beyond_float32, check_finite
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset, split_off_test
from aeserve.training.data.locations import HEADER_BYTES, RemoteFile, open_file, opened, require_file

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
CSV_BLOCK_BYTES = 8 * 2**20  # CSV text parsed per batch (pyarrow's block; one row must fit in it)
# What a field that is not a number is told, by source.
CATEGORIES_ADVICE = "list the column in data.categorical if it holds categories"
NUMBERS_ONLY_ADVICE = 'data.source "csv" takes numbers only; a file with a header row or text columns is a "table"'


class Table:
    """A table read batch by batch, so that one batch at a time is held besides what is kept of it: Parquet row group
    by row group, CSV (delimiter sniffed among , ; tab |; quoting; a UTF-8 BOM) CSV_BLOCK_BYTES at a time. Every CSV
    column is read as text and made a number here: pyarrow's streaming reader would infer a column's type from the
    first block alone and fail on a later block that disagrees. From a URL the same, over an fsspec file: sequential
    reads for CSV, Parquet's footer and then each row group's column chunks by range requests.

    With ``header=False`` the file is a CSV whose first line is data (the ``csv`` source), whatever its name: fields
    separated by commas, its columns named "1", "2", … by their place in the line.
    """

    def __init__(self, path: Path | RemoteFile, header: bool = True) -> None:
        import pyarrow as pa

        self.path, self.header = path, header
        self.parquet = header and path.suffix.lower() in (".parquet", ".pq")
        self.delimiter = ","
        self.types: dict[str, pa.DataType] = {}  # Parquet's column types; a CSV's columns are all read as text
        try:
            if self.parquet:
                import pyarrow.parquet as pq

                with opened(path) as source:
                    schema = pq.ParquetFile(source).schema_arrow
                self.names, self.types = schema.names, dict(zip(schema.names, schema.types, strict=True))
            elif header:
                self.names = self._csv_header()
            else:  # the first line that holds anything: its fields are the columns
                _, fields = next(self._lines("replace"), (0, []))
                self.names = [str(i + 1) for i in range(len(fields))]
        except (pa.ArrowException, OSError) as e:
            what = "Parquet file" if self.parquet else "table"
            raise DataError(f"{path}: not a readable {what} ({str(e).splitlines()[0]})") from None
        repeated = next((name for i, name in enumerate(self.names) if name in self.names[:i]), None)
        if repeated is not None:
            places = [str(i + 1) for i, name in enumerate(self.names) if name == repeated]
            raise DataError(f"{path}: the {'schema' if self.parquet else 'header'} names column {repeated!r} "
                            f"{len(places)} times (columns {', '.join(places)}); give each column its own name")

    def _csv_header(self) -> list[str]:
        """The header line's fields, its delimiter sniffed among , ; tab |."""
        with open_file(self.path, HEADER_BYTES) as f:
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

    def _lines(self, errors: str) -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) of each line of data, by Python's csv module: it names lines where pyarrow does not."""
        with self.path.open("r", newline="", encoding="utf-8-sig", errors=errors) as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            if self.header:
                next(reader, None)
            for fields in reader:
                if fields:
                    yield reader.line_num, fields

    def column(self, name: str) -> str:
        """A column as messages name it: by its name, or without a header by its place in the line."""
        return f"column {name!r}" if self.header else f"field {name}"

    def field(self, row: int, name: str) -> str:
        """A field (its row 0-based, of the data) as an editor shows it: a Parquet row by its number, a CSV row by the
        line it is on (the header and blank lines counted: the file is read again, once the error is known)."""
        if self.parquet:
            return f"{self.path}: row {row + 1}, {self.column(name)}"
        line, _ = next(islice(self._lines("replace"), row, None), (row + 1 + self.header, None))
        return f"{self.path}: line {line}, {self.column(name)}"

    def nested(self, columns: list[str]) -> None:
        """Refuse a column of ``columns`` that holds lists, structs, maps or unions: neither numbers nor text."""
        import pyarrow as pa

        for name in columns:
            if name in self.types and pa.types.is_nested(self.types[name]):
                raise DataError(f"{self.path}: column {name!r} holds {self.types[name]} values (lists, structs or maps); a table's "
                                f"columns must hold numbers or text: leave it out with data.exclude or data.columns")

    def batches(self, columns: list[str], missing: bool = True):
        """The table's rows in order, in batches (pyarrow tables or record batches) of ``columns``. With ``missing`` a
        CSV's empty and NA fields are missing values (null), else the text they hold."""
        import pyarrow as pa
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        try:
            with opened(self.path) as source:
                if self.parquet:
                    parquet = pq.ParquetFile(source)
                    for group in range(parquet.num_row_groups):
                        yield parquet.read_row_group(group, columns=columns)
                    return
                yield from pa_csv.open_csv(
                    source, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, column_names=None if self.header else self.names),
                    parse_options=pa_csv.ParseOptions(delimiter=self.delimiter),
                    convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()), include_columns=columns,
                                                          null_values=list(MISSING_TEXTS), strings_can_be_null=missing,
                                                          quoted_strings_can_be_null=missing))
        except (pa.ArrowException, OSError) as e:
            if not self.parquet and "columns, got" in str(e):
                self._raise_ragged_line()
            if not self.parquet and "invalid UTF8" in str(e):
                self._raise_not_utf8_line(columns)
                raise DataError(f"{self.path}: not UTF-8 text ({str(e).splitlines()[0]}); save the file as UTF-8") from None
            raise DataError(f"{self.path}: not a readable table ({str(e).splitlines()[0]})") from None

    def _raise_ragged_line(self) -> None:
        """Name the first line whose field count differs from the first line's (pyarrow's message names none)."""
        expected = len(self.names)
        for line, fields in self._lines("replace"):
            if len(fields) == expected:
                continue
            if not self.header:
                raise DataError(f"{self.path}: line {line} has {len(fields)} values, earlier rows have {expected} (ragged rows)")
            raise DataError(f"{self.path}: line {line} has {len(fields)} fields, the header {expected} "
                            f"({self.delimiter!r}-separated; quote a field that holds {self.delimiter!r})")

    def _raise_not_utf8_line(self, columns: list[str]) -> None:
        """Name the first line and column of ``columns`` whose bytes are not UTF-8 (pyarrow's message names neither)."""
        used = [i for i, name in enumerate(self.names) if name in columns]
        for line, fields in self._lines("surrogateescape"):
            for i in used:
                text = fields[i] if i < len(fields) else ""
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # the bytes that did not decode, kept as lone surrogates
                    raise DataError(f"{self.path}: line {line}, {self.column(self.names[i])}: the text "
                                    f"{text.encode('utf-8', 'surrogateescape')[:40]!r} is not UTF-8; save the file as UTF-8") from None

    def texts(self, name: str, column):
        """A column of a batch as text (pyarrow strings), or a DataError naming the column when its type has no text."""
        import pyarrow as pa

        try:
            return column.cast(pa.string())
        except pa.ArrowException as e:
            raise DataError(f"{self.path}: {self.column(name)}: its {column.type} values cannot be read as numbers or text "
                            f"({str(e).splitlines()[0]})") from None

    def numbers(self, first: int, name: str, column, advice: str) -> np.ndarray:
        """A feature column of a batch whose first row is ``first``, as float64 with NaN where the field is missing.

        Text is read as numbers by pyarrow's parser, and where it refuses a field (" 2") by Python's float; a field
        neither reads is an error naming its line and ending with ``advice``.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type):
            return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        texts = self.texts(name, column)  # as before, a type that is neither number nor text (bool, date) goes by its text
        try:
            return np.asarray(pc.cast(texts, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        except pa.ArrowInvalid:
            pass
        values = np.empty(len(texts), np.float64)
        for row, text in enumerate(texts.to_pylist()):
            try:
                values[row] = float(text if text is not None else "nan")
            except ValueError:
                raise DataError(f"{self.field(first + row, name)}: {text!r} is not a number; {advice}") from None
        return values

    def dates(self, first: int, name: str, column) -> np.ndarray:
        """A date column of a batch whose first row is ``first`` as (rows, 2) float64, each row's year and day of the
        year (NaN where the field is missing). Text is read as ISO 8601 dates (``1970-01-01``, a time of day left out);
        a field that is not one is an error naming its line."""
        texts = self.texts(name, column).to_pylist()
        out, bad = date_values(texts)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{self.field(first + row, name)}: {texts[row]!r} is not a date (YYYY-MM-DD, as data.dates reads); "
                            f"leave the column out of data.dates to read it otherwise")
        return out


def load_table(config: DataConfig) -> Dataset:
    """A table with a header row: numeric features as they are, ``categorical`` ones one-hot, ``dates`` as their year and
    day of the year, ``label`` kept apart; missing fields as ``data.missing`` says (see ``models/columns.py`` for what
    each column's entry in the manifest's ``features`` holds).

    Read batch by batch (``Table``): what is held is one batch plus, per kept row, the features as float32 (float64
    with ``missing = "median"``, whose medians need the exact values) and a category number per categorical column.
    """
    path = require_file(config)
    table = Table(path)
    names = table.names
    wanted = [config.label] if config.label else []
    for key in ("columns", "exclude", "categorical", "dates"):
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
    fill = config.missing == "median"
    dated = [n for n in features if n in config.dates]
    numeric = [n for n in features if n not in config.categorical and n not in config.dates]
    coded = [n for n in used if n in config.categorical or n == config.label]
    dtype = np.float64 if fill else np.float32
    values: dict[str, list[np.ndarray]] = {name: [] for name in numeric + dated}  # a date's: (rows, 2) year and day
    codes: dict[str, tuple[list[np.ndarray], dict[str, int]]] = {name: ([], {}) for name in coded}  # numbers in order seen, -1: missing
    first = kept = 0
    for batch in table.batches(used):
        nulls = np.zeros(batch.num_rows, bool)
        for name in used:
            column_nulls = batch.column(name).is_null().to_numpy(zero_copy_only=False)
            if column_nulls.any() and config.missing == "error":
                row = first + int(np.argmax(column_nulls))
                raise DataError(f"{table.field(row, name)}: the field is empty or NA; set data.missing = 'drop' or 'median'")
            if name == config.label or config.missing == "drop":
                nulls |= column_nulls
        keep = np.flatnonzero(~nulls)
        for name in numeric:
            column = table.numbers(first, name, batch.column(name), CATEGORIES_ADVICE)[keep]
            infinite = np.isinf(column) if fill else ~np.isfinite(column)  # NaN: filled in below
            beyond = beyond_float32(column)  # the features are float32 in the end, whatever they are held as here
            if infinite.any() or beyond.any():
                at = int(np.argmax(infinite | beyond))
                problem = "the value is not finite" if infinite[at] else f"{float(column[at])!r} is beyond float32's range (±{FLOAT32_MAX:.2g})"
                raise DataError(f"{table.field(first + int(keep[at]), name)}: {problem}")
            values[name].append(column.astype(dtype))
        for name in dated:
            values[name].append(table.dates(first, name, batch.column(name))[keep])
        for name in coded:
            seen, numbers = codes[name]
            texts = np.asarray(table.texts(name, batch.column(name)).to_pylist(), dtype=object)[keep]
            seen.append(np.fromiter((-1 if text is None else numbers.setdefault(text, len(numbers)) for text in texts), np.int64, len(texts)))
        first, kept = first + batch.num_rows, kept + len(keep)
    if kept < 2:
        raise DataError(f"{path}: {kept} usable row(s); at least 2 are needed")
    sorted_codes = {}  # per coded column: (its values sorted, each row's index among them, -1 where missing)
    for name, (seen, numbers) in codes.items():
        categories = sorted(numbers)
        position = {text: i for i, text in enumerate(categories)}
        rank = np.fromiter((position[text] for text in numbers), np.int64, len(numbers))  # in the order numbers were given
        order = np.concatenate(seen)
        sorted_codes[name] = (categories, np.where(order >= 0, rank[np.maximum(order, 0)] if len(rank) else -1, -1))
    described, read, gaps = [], [], []
    for name in features:
        feature, column, missing = _feature(name, config, sorted_codes.get(name), values.pop(name, None))
        described.append(feature)
        read.append(column)
        gaps.append(missing)
    x = Columns(described).encode(read, gaps)
    del read
    y = sorted_codes[config.label][1] if config.label else None
    dataset = split_off_test(path.name, x, y, config, None)
    dataset.features = described
    dataset.facts["table_columns"] = names  # the header: the columns a served row may still carry, and that are left out
    if first > kept:
        why = "an empty or NA field (data.missing = 'drop')" if config.missing == "drop" else f"an empty or NA label ({config.label!r})"
        dataset.facts["dropped_rows"] = {"rows": first - kept, "why": why}
    return dataset


def _feature(name: str, config: DataConfig, coded: tuple[list[str], np.ndarray] | None, parts: list[np.ndarray] | None
             ) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """A feature column's entry in the manifest, fitted here, and its values and missing fields as ``Columns.encode``
    takes them (which maps them, as the server and aeserve encode map theirs, by that entry).

    With ``missing = "median"`` every column gets a ``fill``, except a category with empty fields, whose missing rows
    are a category of their own (its ``indicator`` slot); a number or a date with empty fields gets an indicator too.
    """
    fill = config.missing == "median"
    if coded is not None:
        categories, index = coded
        gaps = index < 0
        feature = {"name": name, "type": "category", "categories": categories}
        if gaps.any():
            feature["indicator"] = True
        elif fill:  # the most common category; the first in sorted order among equals
            feature["fill"] = categories[int(np.argmax(np.bincount(index, minlength=len(categories))))]
        return feature, index, gaps
    column = np.concatenate(parts)
    column = column.reshape(len(column), -1)  # a number's one value, a date's two
    feature = {"name": name, "type": "date" if name in config.dates else "number"}
    if not fill:
        return feature, column, None
    gaps = np.isnan(column[:, 0])
    present = column[~gaps]
    medians = [float(np.median(part)) if len(part) else 0.0 for part in present.T]
    feature["fill"] = medians if feature["type"] == "date" else medians[0]
    if gaps.any():
        feature["indicator"] = True
    return feature, column, gaps


def load_csv(config: DataConfig) -> Dataset:
    """A CSV of numbers, one example per line, no header: read as a table is (``Table``), every field a number."""
    path = require_file(config)
    table = Table(path, header=False)
    blocks, first = [], 0
    for batch in table.batches(table.names, missing=False) if table.names else ():
        blocks.append(np.stack([table.numbers(first, name, batch.column(name), NUMBERS_ONLY_ADVICE) for name in table.names], axis=1))
        first += batch.num_rows
    x = np.concatenate(blocks) if blocks else np.zeros((0, len(table.names)))
    x = check_finite(path, x)  # float32 once checked: a value such as 1e300 is refused
    return split_off_test(path.name, x, None, config, None)
