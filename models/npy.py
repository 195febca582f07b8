"""The ``.npy`` facts that every reader of arrays shares: the header versions read, and float32's range."""
from __future__ import annotations

from typing import BinaryIO

import numpy as np

# A finite float64 (or a big integer) beyond this becomes infinite as the model's float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_header(f: BinaryIO, max_header_size: int = 10_000) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the ``.npy`` that ``f`` is at, leaving ``f`` at its data; None for a header
    version other than 1.0 and 2.0 (numpy.save writes 1.0). Raises ValueError for a malformed header."""
    reader = HEADER_READERS.get(np.lib.format.read_magic(f))
    return None if reader is None else reader(f, max_header_size=max_header_size)
