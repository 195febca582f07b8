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
from datetime import date, timedelta
from typing import Any

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
