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

from aeserve.models.columns import accepts_missing, date_parts, date_text, is_missing, width
from aeserve.service.errors import Invalid, TooManyRows

LEFT_OUT = object()  # an object row's value for a column whose key it does not carry


def _finite(value: int | float) -> bool:
    """Whether a JSON number is finite as a float: an integer of hundreds of digits (JSON has no limit) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class TableRows:
    def __init__(self, features: list[dict[str, Any]], ignored: list[str] = (), missing: str = "error") -> None:
        """``features`` as the manifest lists them; ``ignored``: the table's other columns, which object rows may carry;
        ``missing``: the version's data.missing, named where a missing field is refused."""
        self.features = features
        self.names = [f["name"] for f in features]
        self.categories = {f["name"]: list(f["categories"]) for f in features if f["type"] == "category"}
        self.ignored = [name for name in dict.fromkeys(ignored) if name not in self.names]
        self.missing = missing
        self.slices, start = [], 0
        for feature in features:
            self.slices.append(slice(start, start + width(feature)))
            start += width(feature)
        self.width = start

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
        objects; per row the columns whose missing value was filled)."""
        if not isinstance(rows, list) or not rows:
            raise Invalid("inputs must be a non-empty list of rows")
        if len(rows) > max_rows:
            raise TooManyRows(len(rows), max_rows)
        objects = isinstance(rows[0], dict)
        out = np.zeros((len(rows), self.width), np.float64)
        imputed = []
        for i, row in enumerate(rows):
            filled = []
            for feature, where, value in zip(self.features, self.slices, self._values(i, row, objects), strict=True):
                name, categories = feature["name"], self.categories.get(feature["name"])
                if value is LEFT_OUT or (is_missing(value) and not (categories is not None and value in categories)):
                    self._fill(i, feature, value, out[i, where])
                    filled.append(name)
                elif categories is not None:
                    if value not in categories:
                        raise Invalid(f"row {i}, column {name!r}: unknown category {reprlib.repr(value)}; known: {categories}")
                    out[i, where.start + categories.index(value)] = 1.0
                elif feature["type"] == "date":
                    parts = date_parts(value) if isinstance(value, str) else None
                    if parts is None:
                        raise Invalid(f"row {i}, column {name!r}: expected a date as ISO text (YYYY-MM-DD), got {reprlib.repr(value)}")
                    out[i, where.start:where.start + 2] = parts
                else:
                    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
                        raise Invalid(f"row {i}, column {name!r}: expected a finite number, got {reprlib.repr(value)}")
                    out[i, where.start] = value
            imputed.append(filled)
        return out, objects, imputed

    def _fill(self, i: int, feature: dict[str, Any], value: Any, values: np.ndarray) -> None:
        """Write a missing field's values into ``values`` (the row's slice), as training filled it, or refuse it."""
        if not accepts_missing(feature):
            send = {"number": "a finite number", "date": "a date as ISO text (YYYY-MM-DD)"}.get(feature["type"]) or f"one of {feature['categories']}"
            why = (f"this version was trained with data.missing = {self.missing!r}, so it fills no missing field" if self.missing != "median"
                   else "this version holds no value to fill it with (published before served rows were filled)")
            got = "left out" if value is LEFT_OUT else f"missing ({reprlib.repr(value)})"
            raise Invalid(f"row {i}, column {feature['name']!r}: the value is {got}; {why}: send {send}")
        if feature["type"] == "category":
            if feature.get("indicator"):
                values[-1] = 1.0  # missing is a category of its own
            else:
                values[feature["categories"].index(feature["fill"])] = 1.0
            return
        fill = np.atleast_1d(feature["fill"])
        values[:len(fill)] = fill
        if feature.get("indicator"):
            values[-1] = 1.0

    def _values(self, i: int, row: Any, objects: bool) -> list[Any]:
        if objects:
            if not isinstance(row, dict):
                raise Invalid(f"row {i}: expected an object keyed by column name, as row 0 is")
            missing = [f["name"] for f in self.features if f["name"] not in row and not accepts_missing(f)]
            extra = [k for k in row if k not in self.names and k not in self.ignored]
            if missing or extra:
                problems = []
                if missing:
                    problems.append(f"column(s) {missing} missing (this version was trained with data.missing = {self.missing!r}: "
                                    f"send {'them' if len(missing) > 1 else 'it'})")
                if extra:
                    problems.append(f"unknown column(s) {extra}")
                raise Invalid(f"row {i}: " + "; ".join(problems) + f"; the columns are {self.names}"
                              + (f" (and, ignored, {self.ignored})" if self.ignored else ""))
            return [row.get(n, LEFT_OUT) for n in self.names]
        if not isinstance(row, list) or len(row) != len(self.names):
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise Invalid(f"row {i}: expected {len(self.names)} values in the column order {self.names}, got {got}")
        return row

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
