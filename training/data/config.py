"""The ``[data]`` section of a training config: which source, where it is, and how its rows are read and scaled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Interval, MaxLen

from aeserve.models.config import Config, Count, Size

# data.source: one per loader in ``sources.SOURCES`` (a test checks that the two agree).
Source = Literal["fashion-mnist", "digits", "npy", "npz", "csv", "table", "images"]
Fraction = Annotated[float, Interval(ge=0, lt=0.5)]


@dataclass(frozen=True)
class DataConfig(Config):
    section = "data"

    source: Source = "fashion-mnist"
    path: str = ""
    # Fraction of the training examples held out for validation (model selection only).
    val_fraction: Fraction = 0.1
    # For sources without a test split: fraction held out as the test set for the final metrics.
    test_fraction: Fraction = 0.1
    # Use only the first N training examples (0: all); for quick tries and tests.
    limit: Count = 0
    # Fashion-MNIST only: fetch the IDX files into `path` when they are missing.
    download: bool = False
    # How values map to the model's space: global (one offset and scale, the data in [0, 1]), minmax (each feature in
    # [0, 1]), standard (each feature mean 0, deviation 1); auto: standard for tables, global for everything else.
    scaling: Literal["auto", "global", "minmax", "standard"] = "auto"
    # Tables: the label column (kept out of the features), the feature columns (default: all but the label and
    # `exclude`), the columns one-hot encoded, the columns of dates (each read as its year and day of the year), and
    # what to do with empty or NA fields: refuse them, drop their rows, or fill them (a number with its median, a date
    # with its median year and day, a category with its most common value; a column with empty fields also gets an
    # indicator, a category a slot of its own) and fill them again when serving. `aeserve train --data` infers all of
    # these from the table where --set gives none.
    label: str = ""
    columns: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()
    missing: Literal["error", "drop", "median"] = "error"
    # Images: every picture brought to [height, width] (default: the first image's size) with channels 1 or 3
    # (0: 1 when every image is gray, else 3); an unreadable file is an error, or skipped and counted with skip_bad.
    image_size: Annotated[tuple[Size, ...], MaxLen(2)] = ()
    channels: Literal[0, 1, 3] = 0
    skip_bad: bool = False
    # Images: decoded once into memory, or lazily as training draws each batch (auto: lazily when the pixels would take
    # more than IMAGE_MEMORY_BYTES), by this many DataLoader worker processes (at most the CPUs; 0: in this process).
    decode: Literal["auto", "memory", "lazy"] = "auto"
    workers: Count = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.image_size) not in (0, 2):
            raise ValueError(f"data.image_size must be [height, width], got {list(self.image_size)}")
        for key in ("columns", "exclude", "categorical", "dates"):
            names = getattr(self, key)
            repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
            if repeated is not None:
                raise ValueError(f"data.{key} names {repeated!r} more than once, got {list(names)}")
        both = next((name for name in self.dates if name in self.categorical), None)
        if both is not None:
            raise ValueError(f"data.dates and data.categorical both name {both!r}; a column is read one way: leave it out of one")

    @property
    def resolved_scaling(self) -> str:
        if self.scaling != "auto":
            return self.scaling
        return "standard" if self.source == "table" else "global"
