"""A table version's rows in JSON: arrays in the manifest's column order, or objects keyed by column name.

Numbers go as they are, a categorical column as its category, which the model sees one-hot (the vocabulary is the
manifest's), and a date as ISO text (``1970-01-01``), which the model sees as its year and day of the year. A missing
field (null, one of ``MISSING_TEXTS`` such as "NA" or "", or a key left out of an object row) is filled as training
filled it, where the version was trained to (``models/columns.py``), and named in the answer's ``imputed``; where it
was not, it is refused, saying why. An object row may still carry the columns that training left out (the label, an
excluded column): they are ignored. Answers follow the rows' form: a reconstruction comes back as rows of the same
form, with each category the one the model holds most likely (null where that is the missing one's slot), and
``feature_errors`` as one squared error per column (summed over a column's values: one-hot, a date's two, an
indicator), in the scaled space.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any

import numpy as np

from aeserve.models.columns import Columns, accepts_missing, date_text, date_values, is_missing
from aeserve.service.errors import Invalid, TooManyRows

LEFT_OUT = object()  # an object row's value for a column whose key it does not carry


def _finite(value: int | float) -> bool:
    """Whether a JSON number is finite as a float: an integer of hundreds of digits (JSON has no limit) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _index(categories: list, value: Any) -> int:
    """A value's place among ``categories`` by equality (a JSON value that is not text), or -1."""
    try:
        return categories.index(value)
    except ValueError:
        return -1


class TableRows:
    def __init__(self, features: list[dict[str, Any]], ignored: list[str] = (), missing: str = "error") -> None:
        """``features`` as the manifest lists them; ``ignored``: the table's other columns, which object rows may carry;
        ``missing``: the version's data.missing, named where a missing field is refused."""
        self.features = features
        self.columns = Columns(features)
        self.names, self.slices, self.width = self.columns.names, self.columns.slices, self.columns.width
        self.categories = {f["name"]: list(f["categories"]) for f in features if f["type"] == "category"}
        self.index = {name: {text: k for k, text in enumerate(known)} for name, known in self.categories.items()}
        self.ignored = [name for name in dict.fromkeys(ignored) if name not in self.names]
        self.missing = missing
        self.keys = set(self.names)

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> TableRows | None:
        features = manifest.get("features")
        if not features:
            return None
        training = manifest.get("training", {})
        data = training.get("data", {})
        ignored = [*training.get("table_columns", []), *([data["label"]] if data.get("label") else []), *data.get("exclude", [])]
        return cls(features, ignored, data.get("missing", "error"))

    def encode(self, rows: Any, max_rows: int) -> tuple[np.ndarray, bool, list[list[str]]]:
        """JSON rows -> ((n, width) float64 as the model takes them, checked in this precision; whether they were
        objects; per row the columns whose missing value was filled). Read column by column; the error named is the
        first bad field in row order, then column order, as a row-by-row reading would find it."""
        if not isinstance(rows, list) or not rows:
            raise Invalid("inputs must be a non-empty list of rows")
        if len(rows) > max_rows:
            raise TooManyRows(len(rows), max_rows)
        objects = isinstance(rows[0], dict)
        shaped, problem = self._shaped(rows, objects)
        if objects:
            raw = [[row.get(name, LEFT_OUT) for row in rows[:shaped]] for name in self.names]
        else:
            raw = [list(column) for column in zip(*rows[:shaped], strict=True)] or [[] for _ in self.names]
        values, missing, first = [], [], None  # first: (row, column, message) of the first bad field
        for j, (feature, column) in enumerate(zip(self.features, raw, strict=True)):
            read, gaps, bad = self._read(feature, column)
            refused = self.columns.refused(j, gaps)
            if refused is not None and (bad is None or refused < bad[0]):
                bad = refused, self._refusal(feature, column[refused])
            if bad is not None and (first is None or bad[0] < first[0]):
                first = bad[0], j, bad[1]
            values.append(read)
            missing.append(gaps)
        if first is not None:
            raise Invalid(f"row {first[0]}, column {self.names[first[1]]!r}: {first[2]}")
        if problem is not None:
            raise Invalid(problem)
        out = self.columns.encode(values, missing, np.float64)
        gaps = [(j, m) for j, m in enumerate(missing) if m is not None and m.any()]
        if not gaps:
            return out, objects, [[] for _ in rows]
        filled = np.stack([m for _, m in gaps], axis=1)
        names = [self.names[j] for j, _ in gaps]
        return out, objects, [[names[k] for k in np.flatnonzero(row)] for row in filled]

    def _read(self, feature: dict[str, Any], column: list[Any]) -> tuple[np.ndarray, np.ndarray | None, tuple[int, str] | None]:
        """A column's JSON values -> (its values as ``Columns.encode`` takes them, (n,) bool where missing or None,
        (row, what is wrong) of its first bad value or None)."""
        n = len(column)
        if feature["type"] == "category":
            lookup, known = self.index[feature["name"]], self.categories[feature["name"]]
            index = np.fromiter((lookup.get(v, -1) if type(v) is str else _index(known, v) for v in column), np.int64, n)
            unread = np.flatnonzero(index < 0)
            if not len(unread):
                return index, None, None
            gaps = np.zeros(n, bool)
            for i in unread:
                value = column[i]
                if not (value is LEFT_OUT or is_missing(value)):
                    return index, gaps, (int(i), f"unknown category {reprlib.repr(value)}; known: {known}")
                gaps[i] = True
            return index, gaps, None
        if feature["type"] == "date":
            parts, bad = date_values([None if v is LEFT_OUT else v for v in column])
            gaps = np.isnan(parts[:, 0]) & ~bad
            for i in np.flatnonzero(bad):
                value = column[i]
                if not is_missing(value):
                    return parts, gaps, (int(i), f"expected a date as ISO text (YYYY-MM-DD), got {reprlib.repr(value)}")
                gaps[i], bad[i] = True, False
            return parts, gaps, None
        if all(type(v) is float or type(v) is int for v in column):
            try:
                numbers = np.array(column, np.float64)
            except OverflowError:  # an integer beyond float64's range: named below
                numbers = None
            if numbers is not None and np.isfinite(numbers).all():
                return numbers, None, None
        numbers, gaps = np.full(n, np.nan), np.zeros(n, bool)
        for i, value in enumerate(column):
            if value is LEFT_OUT or is_missing(value):
                gaps[i] = True
            elif isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
                return numbers, gaps, (i, f"expected a finite number, got {reprlib.repr(value)}")
            else:
                numbers[i] = value
        return numbers, gaps, None

    def _refusal(self, feature: dict[str, Any], value: Any) -> str:
        """Why a missing field of a column that fills none is refused, and what to send."""
        send = {"number": "a finite number", "date": "a date as ISO text (YYYY-MM-DD)"}.get(feature["type"]) or f"one of {feature['categories']}"
        why = (f"this version was trained with data.missing = {self.missing!r}, so it fills no missing field" if self.missing != "median"
               else "this version holds no value to fill it with (published before served rows were filled)")
        got = "left out" if value is LEFT_OUT else f"missing ({reprlib.repr(value)})"
        return f"the value is {got}; {why}: send {send}"

    def _shaped(self, rows: list, objects: bool) -> tuple[int, str | None]:
        """How many leading rows have the rows' form, and what is wrong with the next one (None if all have it)."""
        for i, row in enumerate(rows):
            if objects:
                if not isinstance(row, dict):
                    return i, f"row {i}: expected an object keyed by column name, as row 0 is"
                if row.keys() == self.keys:
                    continue
                missing = [f["name"] for f in self.features if f["name"] not in row and not accepts_missing(f)]
                extra = [k for k in row if k not in self.names and k not in self.ignored]
                if missing or extra:
                    problems = []
                    if missing:
                        problems.append(f"column(s) {missing} missing (this version was trained with data.missing = {self.missing!r}: "
                                        f"send {'them' if len(missing) > 1 else 'it'})")
                    if extra:
                        problems.append(f"unknown column(s) {extra}")
                    return i, (f"row {i}: " + "; ".join(problems) + f"; the columns are {self.names}"
                               + (f" (and, ignored, {self.ignored})" if self.ignored else ""))
            elif not isinstance(row, list) or len(row) != len(self.names):
                got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
                return i, f"row {i}: expected {len(self.names)} values in the column order {self.names}, got {got}"
        return len(rows), None

    def decode(self, x: np.ndarray, objects: bool) -> list:
        """(n, width) values in the data's units -> rows of the same form as the request's."""
        columns = []
        for feature, where in zip(self.features, self.slices, strict=True):
            categories = self.categories.get(feature["name"])
            if categories is not None:
                columns.append([categories[k] if k < len(categories) else None for k in np.argmax(x[:, where], axis=1)])
            elif feature["type"] == "date":
                columns.append([date_text(year, day) for year, day in x[:, where.start:where.start + 2].tolist()])
            else:
                columns.append(x[:, where.start].tolist())
        return self._rows(columns, objects)

    def per_column(self, errors: np.ndarray, objects: bool) -> list:
        """(n, width) squared errors -> each row's error per column."""
        return self._rows([errors[:, where].sum(axis=1).tolist() for where in self.slices], objects)

    def _rows(self, columns: list[list], objects: bool) -> list:
        rows = list(zip(*columns, strict=True))
        return [dict(zip(self.names, row, strict=True)) for row in rows] if objects else [list(row) for row in rows]
