"""What ``aeserve train --data`` infers of a table's columns when no config names them: numbers, dates, categories,
and the columns left out (row numbers, names, free text) with the reason; read in one pass over the table."""
from __future__ import annotations

from typing import Any

import numpy as np

from aeserve.models.columns import DATE_PATTERN
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.locations import require_file
from aeserve.training.data.tables import Table

# What ``aeserve train --data`` infers of a table's columns (``infer_columns``): a text column with at most this many
# distinct values, and at most one per two filled fields, is one-hot encoded; one with more is a name, an identifier or
# free text, and is left out.
MAX_CATEGORIES = 50
MAX_TRACKED = 65536  # distinct texts counted per column, at most: beyond, it is surely not categorical
FREE_TEXT_SPACES = 0.5  # a text column left out is called free text when this share of its distinct values holds a space


class _Profile:
    """What one pass over a column learns of it, for ``infer_columns``."""

    def __init__(self) -> None:
        self.rows = self.empty = 0
        self.unusable: str | None = None  # why it holds neither numbers nor text
        self.text = False  # some filled field is not a number
        self.dates = True  # every filled field is an ISO date (or the column's type is a date)
        self.distinct: set[str] = set()  # up to MAX_TRACKED of its texts
        self.pending: list = []  # while its fields are numbers: each batch's distinct texts (pyarrow arrays)
        self.tracked = 0  # how many texts pending holds; MAX_TRACKED: too many to count
        self.counting = True  # integers counting up by one, row after row, with no empty field: a row number
        self.last: float | None = None

    def numbers(self, values: np.ndarray) -> None:
        if self.counting and len(values):
            steps = np.diff(np.concatenate([[values[0] - 1 if self.last is None else self.last], values]))
            self.counting = bool(np.all(steps == 1))
            self.last = float(values[-1])

    def texts(self, texts) -> None:
        import pyarrow.compute as pc

        present = texts.drop_null()
        if not len(present):
            return
        if not self.text:
            numbers = _text_numbers(present)
            if numbers is not None:  # numbers so far: their texts are kept as arrow arrays, made Python texts only if a later batch is text
                self.dates = False
                self.numbers(numbers)
                if self.tracked < MAX_TRACKED:
                    self.pending.append(pc.unique(present))
                    self.tracked += len(self.pending[-1])
                return
            self.text = True
            for values in self.pending:
                self.distinct.update(values.to_pylist())
            self.pending = []
        if self.dates:
            self.dates = bool(pc.all(pc.match_substring_regex(present, DATE_PATTERN)).as_py())
        if len(self.distinct) <= MAX_TRACKED:
            self.distinct.update(pc.unique(present).to_pylist())
        else:
            self.tracked = MAX_TRACKED

    def kind(self, name: str) -> tuple[str, str | None]:
        """("number" | "category" | "date" | "exclude", why it is left out)."""
        filled = self.rows - self.empty
        if self.unusable:
            return "exclude", self.unusable
        if not filled:
            return "exclude", "every field is empty"
        if self.text and self.dates:
            return "date", None
        if not self.text:
            if self.counting and not self.empty and filled > 2:
                return "exclude", f"identifier-like: whole numbers counting up by one, row after row, to {self.last:g}"
            return "number", None
        distinct = MAX_TRACKED + 1 if self.tracked >= MAX_TRACKED else len(self.distinct)
        if distinct <= MAX_CATEGORIES and distinct <= max(2, filled // 2):
            return "category", None
        many = f"more than {MAX_TRACKED:,}" if distinct > MAX_TRACKED else f"{distinct:,}"
        if sum(" " in text for text in self.distinct) > FREE_TEXT_SPACES * distinct:
            why = f"free text: {many} different texts in {filled:,} filled fields, most of several words"
        elif distinct == filled:
            why = f"identifier-like: each of its {filled:,} filled fields is a different text"
        else:
            why = f"{many} different texts in {filled:,} filled fields: too many to one-hot (at most {MAX_CATEGORIES}, and one per two fields)"
        return "exclude", f"{why}; list it in data.categorical to one-hot it anyway"


def _text_numbers(texts) -> np.ndarray | None:
    """Texts (without nulls) as float64 when every one is a number, as ``Table.numbers`` reads them; else None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.asarray(pc.cast(texts, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except pa.ArrowInvalid:
        pass
    try:
        return np.array([float(text) for text in texts.to_pylist()], np.float64)
    except ValueError:
        return None


def infer_columns(config: DataConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """What each column of the table at ``config.path`` is, read in one pass: the ``[data]`` keys that make it so, and
    a record of what was inferred and why, for the manifest.

    Only the columns that ``config`` does not name (as its label, or in exclude, categorical or dates) are inferred; of
    ``data.columns`` when it is given, else of every column. Numbers stay numbers, except whole numbers counting up by
    one row after row (a row number); a text column of ISO dates is a date; one with few distinct values
    (MAX_CATEGORIES) a category; every other (names, identifiers, free text), and a column whose every field is empty,
    is left out, with the reason.
    """
    import pyarrow as pa

    path = require_file(config)
    table = Table(path)
    named = {config.label, *config.exclude, *config.categorical, *config.dates}
    unknown = [c for c in [*config.columns, *named] if c and c not in table.names]
    if unknown:
        raise DataError(f"{path}: no column(s) {unknown}; the header names {table.names}")
    candidates = [n for n in (config.columns or table.names) if n not in named]
    profiles = {name: _Profile() for name in candidates}
    for batch in table.batches(candidates) if candidates else ():
        for name, profile in profiles.items():
            column = batch.column(name)
            profile.rows += len(column)
            profile.empty += column.null_count
            kind = column.type
            if profile.unusable:
                continue
            if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                profile.unusable = f"holds {kind} values, neither numbers nor text"
            elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
                profile.dates = False
                profile.numbers(np.asarray(column.drop_null().to_numpy(zero_copy_only=False), np.float64))
            elif pa.types.is_date(kind) or pa.types.is_timestamp(kind):
                profile.text = True  # a date type: dates, whatever its text
            else:
                profile.texts(table.texts(name, column))
    kinds = {name: profile.kind(name) for name, profile in profiles.items()}
    chosen = {key: [name for name, (kind, _) in kinds.items() if kind == key] for key in ("category", "date", "exclude")}
    keys = {"exclude": [*config.exclude, *chosen["exclude"]], "categorical": [*config.categorical, *chosen["category"]],
            "dates": [*config.dates, *chosen["date"]]}
    record = {"categorical": chosen["category"], "dates": chosen["date"],
              "excluded": {name: why for name, (kind, why) in kinds.items() if kind == "exclude"},
              "empty_fields": {name: p.empty for name, p in profiles.items() if p.empty and kinds[name][0] != "exclude"}}
    if config.columns:
        keys["columns"] = [n for n in config.columns if n not in chosen["exclude"]]
    return keys, record
