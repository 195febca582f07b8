"""``data.source`` → its loader, and load_dataset: the one call training makes for its data."""
from __future__ import annotations

from collections.abc import Callable

from aeserve.training.data.arrays import load_npy, load_npz
from aeserve.training.data.builtin import load_digits, load_fashion_mnist
from aeserve.training.data.config import DataConfig, Source
from aeserve.training.data.dataset import Dataset, take
from aeserve.training.data.images import load_images
from aeserve.training.data.scaling import fit_scaling
from aeserve.training.data.tables import load_csv, load_table

SOURCES: dict[Source, Callable[[DataConfig], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "npy": load_npy,
    "npz": load_npz,
    "csv": load_csv,
    "table": load_table,
    "images": load_images,
}


def load_dataset(config: DataConfig) -> Dataset:
    """The source's data, limited, with its preprocessing fitted on the training split where the source has none of
    its own (Fashion-MNIST and digits know their pixel range) or ``data.scaling`` asks for one."""
    dataset = SOURCES[config.source](config)
    if config.limit:
        dataset.train_x = take(dataset.train_x, slice(0, config.limit))
        dataset.train_y = None if dataset.train_y is None else dataset.train_y[: config.limit]
    if dataset.preprocessing is None or config.scaling != "auto":
        dataset.preprocessing = fit_scaling(config.path or dataset.name, dataset.train_x, config.resolved_scaling)
    return dataset
