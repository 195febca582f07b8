"""ModelRows: rows of a raw array in the model's space, scaled batch by batch as training and evaluation draw them."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from aeserve.models.preprocessing import Preprocessing
from aeserve.training.data.dataset import RELEASE_BYTES, FileRows, release_pages
from aeserve.training.data.images import ImageFiles


class ModelRows:
    """Rows of a raw array (n, *input_shape) in the model's space, scaled when asked for: the training set without a
    float32 copy of the whole of it.

    ``rows[index]`` (a tensor or array of row numbers, or a slice) is a float32 tensor (k, input_dim), the same values
    as scaling everything first and indexing after. ``index`` (m,) picks and orders the rows of ``raw`` this holds.
    """

    def __init__(self, raw: np.ndarray, preprocessing: Preprocessing, index: np.ndarray | None = None) -> None:
        self.raw, self.preprocessing = raw, preprocessing
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self._read = 0
        self._file: FileRows | bool | None = None  # how rows are gathered, found at the first gather

    def __len__(self) -> int:
        return len(self.raw) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.preprocessing.input_dim)

    def subset(self, index) -> ModelRows:
        """The rows ``index`` (m,) of these rows, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return ModelRows(self.raw, self.preprocessing, index if self.index is None else self.index[index])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        rows = key if self.index is None else self.index[key]
        if isinstance(rows, slice):
            raw = self.raw[rows]
            self._touched(raw.nbytes)
        else:
            raw = self._gather(np.asarray(rows))
        return torch.from_numpy(self.preprocessing.to_model(raw))

    def batches(self, row_lists) -> Iterator[torch.Tensor]:
        """self[rows] for each of ``row_lists`` (tensors or arrays of row numbers) in turn: how training draws its
        batches. An image folder decoded lazily decodes them in its DataLoader worker processes, ahead of the consumer."""
        if not isinstance(self.raw, ImageFiles):
            yield from (self[rows] for rows in row_lists)
            return
        lists = [np.asarray(rows) if self.index is None else self.index[np.asarray(rows)] for rows in row_lists]
        for raw in self.raw.batches(lists):
            yield torch.from_numpy(self.preprocessing.to_model(raw))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """raw[rows]: from a memory-mapped file by pread (``FileRows``: the mapping's pages would fill the resident
        set), else by indexing."""
        if self._file is None:
            self._file = FileRows.of(self.raw) or False
        return self._file[rows] if self._file else self.raw[rows]

    def _touched(self, nbytes: int) -> None:
        """Count bytes read; past RELEASE_BYTES a memory-mapped file's pages leave the resident set."""
        self._read += nbytes
        if self._read >= RELEASE_BYTES:
            release_pages(self.raw)
            self._read = 0

    def tensor(self) -> torch.Tensor:
        """Every row, (len, input_dim) float32: only for rows known to fit in memory."""
        return self[slice(None)]
