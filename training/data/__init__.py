"""Training data: one module per source behind one call, ``load_dataset(DataConfig) -> Dataset``.

``config`` (the [data] section), ``dataset`` (what every source gives), ``locations`` (local paths and object storage),
the sources ``builtin`` (Fashion-MNIST, digits), ``arrays`` (.npy/.npz), ``tables`` (CSV, TSV, Parquet) and
``images`` (image folders, decoded in ``parallel`` worker processes), then ``scaling`` (the preprocessing fit),
``sources`` (load_dataset) and ``rows`` (ModelRows: the rows in the model's space, as training draws them).
"""
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError, Dataset
from aeserve.training.data.rows import ModelRows
from aeserve.training.data.sources import load_dataset

__all__ = ["DataConfig", "DataError", "Dataset", "ModelRows", "load_dataset"]
