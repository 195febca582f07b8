"""A table version's rows in JSON: arrays in the manifest's column order, or objects keyed by column name.

Numbers go as they are and a categorical column as its category, which the model sees one-hot (the vocabulary is
the manifest's). Answers follow the rows' form: a reconstruction comes back as rows of the same form, with each
category the one the model holds most likely, and ``feature_errors`` as one squared error per column (a categorical
column's summed over its one-hot values), in the scaled space.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any

import numpy as np

from aeserve.service.errors import Invalid, TooManyRows


def _finite(value: int | float) -> bool:
    """Whether a JSON number is finite as a float: an integer of hundreds of digits (JSON has no limit) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class TableRows:
    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.names = [f["name"] for f in features]
        self.categories = {f["name"]: list(f["categories"]) for f in features if f["type"] == "category"}
        self.slices, start = [], 0
        for name in self.names:
            width = len(self.categories.get(name, [None]))
            self.slices.append(slice(start, start + width))
            start += width
        self.width = start

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> TableRows | None:
        features = manifest.get("features")
        return cls(features) if features else None

    def encode(self, rows: Any, max_rows: int) -> tuple[np.ndarray, bool]:
        """JSON rows -> ((n, width) float64 as the model takes them, checked in this precision; whether they were objects)."""
        if not isinstance(rows, list) or not rows:
            raise Invalid("inputs must be a non-empty list of rows")
        if len(rows) > max_rows:
            raise TooManyRows(len(rows), max_rows)
        objects = isinstance(rows[0], dict)
        out = np.zeros((len(rows), self.width), np.float64)
        for i, row in enumerate(rows):
            for name, where, value in zip(self.names, self.slices, self._values(i, row, objects), strict=True):
                categories = self.categories.get(name)
                if categories is None:
                    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
                        raise Invalid(f"row {i}, column {name!r}: expected a finite number, got {reprlib.repr(value)}")
                    out[i, where.start] = value
                elif value not in categories:
                    raise Invalid(f"row {i}, column {name!r}: unknown category {value!r}; known: {categories}")
                else:
                    out[i, where.start + categories.index(value)] = 1.0
        return out, objects

    def _values(self, i: int, row: Any, objects: bool) -> list[Any]:
        if objects:
            if not isinstance(row, dict):
                raise Invalid(f"row {i}: expected an object keyed by column name, as row 0 is")
            missing = [n for n in self.names if n not in row]
            extra = [k for k in row if k not in self.names]
            if missing or extra:
                raise Invalid(f"row {i}: " + "; ".join(
                    [*([f"column(s) {missing} missing"] if missing else []), *([f"unknown column(s) {extra}"] if extra else [])])
                    + f"; the columns are {self.names}")
            return [row[n] for n in self.names]
        if not isinstance(row, list) or len(row) != len(self.names):
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise Invalid(f"row {i}: expected {len(self.names)} values in the column order {self.names}, got {got}")
        return row

    def decode(self, x: np.ndarray, objects: bool) -> list:
        """(n, width) values in the data's units -> rows of the same form as the request's."""
        columns = []
        for name, where in zip(self.names, self.slices, strict=True):
            categories = self.categories.get(name)
            if categories is None:
                columns.append(x[:, where.start].tolist())
            else:
                columns.append([categories[k] for k in np.argmax(x[:, where], axis=1)])
        return self._rows(columns, objects)

    def per_column(self, errors: np.ndarray, objects: bool) -> list:
        """(n, width) squared errors -> each row's error per column."""
        return self._rows([errors[:, where].sum(axis=1).tolist() for where in self.slices], objects)

    def _rows(self, columns: list[list], objects: bool) -> list:
        rows = list(zip(*columns, strict=True))
        return [dict(zip(self.names, row, strict=True)) for row in rows] if objects else [list(row) for row in rows]
