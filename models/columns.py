"""A table version's columns as training read them and serving reads them again: which fields are missing, dates as
numbers, and how many values each column gives the model.

A column's entry in the manifest's ``features`` (``{"name", "type", ...}``) says all of it:

- ``type``: ``number`` (one value), ``category`` (one-hot over ``categories``, sorted) or ``date`` (two values, the
  year and the day of the year, 1-366);
- ``fill``: what a missing field becomes (a number's training median, a date's median year and day, a category's
  most common value); present only where the version was trained with ``data.missing = "median"``;
- ``indicator``: one more value, 1 where the field was missing and 0 elsewhere, for a column that had empty fields in
  training (a category's is its own one-hot slot: missing is then a category of its own, and has no ``fill``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

import numpy as np

# The texts a CSV field reads as missing in training (pyarrow's defaults, given to it explicitly), and that serving
# reads as missing too, besides JSON null and a left-out key.
MISSING_TEXTS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "N/A", "NA", "NULL", "NaN",
                 "n/a", "nan", "null")
# A date as ISO 8601 writes it, with or without a time of day (which is read and left out: a date is its day).
DATE_PATTERN = r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{2}:?\d{2}(?::\d{2}(?:\.\d+)?)?)?)?$"
DATE_PARTS = ("year", "day_of_year")
_DATE = re.compile(DATE_PATTERN)


def is_missing(value: Any) -> bool:
    """Whether a value sent for a field stands for a missing one: null or one of MISSING_TEXTS."""
    return value is None or (isinstance(value, str) and value in MISSING_TEXTS)


def date_parts(text: str) -> tuple[int, int] | None:
    """``"1970-03-02"`` (or with a time of day) -> (1970, 61): the year and the day of the year; None if not a date."""
    match = _DATE.match(text)
    if match is None:
        return None
    try:
        day = date(*map(int, match.groups()))
    except ValueError:  # a month 13, a 30 February
        return None
    return day.year, day.timetuple().tm_yday


def date_text(year: float, day_of_year: float) -> str:
    """The date nearest to a (year, day of year) pair, as ``YYYY-MM-DD``: what a reconstructed date column answers."""
    year = min(9999, max(1, round(year)))
    days = 366 if date(year, 12, 31).timetuple().tm_yday == 366 else 365
    return (date(year, 1, 1) + timedelta(days=min(days, max(1, round(day_of_year))) - 1)).isoformat()


def width(feature: dict[str, Any]) -> int:
    """How many values a column gives the model."""
    values = {"number": 1, "date": len(DATE_PARTS)}.get(feature["type"]) or len(feature["categories"])
    return values + bool(feature.get("indicator"))


def accepts_missing(feature: dict[str, Any]) -> bool:
    """Whether a missing field of this column is filled (or is a category of its own) rather than refused."""
    return "fill" in feature or bool(feature.get("indicator"))


def date_values(texts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Texts (n,) -> ((n, 2) float64 year and day of the year, NaN where a text is None; (n,) bool, True where a value
    is not a date as ISO text, a text or not). Each distinct text is parsed once."""
    out = np.full((len(texts), len(DATE_PARTS)), np.nan)
    bad = np.zeros(len(texts), bool)
    read: dict[str, tuple[int, int] | None] = {}
    for row, text in enumerate(texts):
        if text is None:
            continue
        if type(text) is not str:
            bad[row] = True
            continue
        if text not in read:
            read[text] = date_parts(text)
        parts = read[text]
        if parts is None:
            bad[row] = True
        else:
            out[row] = parts
    return out, bad


class MissingRefused(ValueError):
    """A missing field of a column that fills none (``accepts_missing`` is false): ``row`` 0-based, ``name`` the column."""

    def __init__(self, row: int, name: str) -> None:
        super().__init__(f"row {row}, column {name!r}: a missing field, and the column fills none")
        self.row, self.name = row, name


class Columns:
    """A version's named columns (the manifest's ``features``) -> raw rows as the model takes them: where each column's
    values sit in a row (``slices``, ``width``), and ``encode``, the one mapping of read values to those rows that
    training, the server and ``aeserve encode`` share. Reading a column (a file's text, a request's JSON, an Arrow
    array) and naming where a value is wrong stay with each reader."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features
        self.names = [f["name"] for f in features]
        self.widths = [width(f) for f in features]
        self.slices, start = [], 0
        for w in self.widths:
            self.slices.append(slice(start, start + w))
            start += w
        self.width = start

    def refused(self, column: int, missing: np.ndarray | None) -> int | None:
        """The first row whose field of column ``column`` (its place in ``features``) is missing, where that column
        fills none; None if there is none."""
        if missing is None or accepts_missing(self.features[column]) or not missing.any():
            return None
        return int(np.argmax(missing))

    def encode(self, values: Sequence[np.ndarray], missing: Sequence[np.ndarray | None], dtype: type = np.float32) -> np.ndarray:
        """Read values, one array per column, -> (n, width) ``dtype``.

        ``values[j]``: a number column's (n,) float64, a date's (n, 2) float64 year and day of the year, a category's
        (n,) integer index into its ``categories`` (anything where missing); ``missing[j]``: (n,) bool, True where the
        field is missing (None: none is). A missing field takes the column's ``fill`` (a category's missing one its
        ``indicator`` slot, when it has one), and its ``indicator`` value is 1; a column that fills none raises
        MissingRefused. Other values are written as they are (a float64 beyond float32's range becomes infinite)."""
        n = len(values[0]) if len(values) else 0
        out = np.zeros((n, self.width), dtype)
        for j, (feature, where, column, gaps) in enumerate(zip(self.features, self.slices, values, missing, strict=True)):
            row = self.refused(j, gaps)
            if row is not None:
                raise MissingRefused(row, feature["name"])
            gaps = gaps if gaps is not None and gaps.any() else None
            block = out[:, where]
            if feature["type"] == "category":
                index = np.asarray(column, np.int64)
                if gaps is not None:  # missing is a category of its own where the column has an indicator
                    filled = len(feature["categories"]) if feature.get("indicator") else feature["categories"].index(feature["fill"])
                    index = np.where(gaps, filled, index)
                block[np.arange(n), index] = 1.0
                continue
            column = np.asarray(column).reshape(n, -1)
            parts = column.shape[1]
            if gaps is not None and "fill" in feature:
                column = np.where(gaps[:, None], np.atleast_1d(np.asarray(feature["fill"], np.float64)), column)
            with np.errstate(over="ignore"):
                block[:, :parts] = column
            if feature.get("indicator") and gaps is not None:
                block[:, parts] = gaps
        return out
