"""The nearest-neighbour indexes the server was given (``--index NAME=PATH``), and the neighbors operation's rules.

Each index (``models/index.py``, built by ``aeserve index``) holds the codes of one version; a request reaches it
through that version. Knows no protocol: errors are ``service/errors.py``'s.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from aeserve.models.index import MAX_K, CodeIndex, IndexFileError
from aeserve.service.codec import validate_rows
from aeserve.service.errors import Conflict, Invalid, NotFound
from aeserve.service.pipeline import VALUE_RANGE

if TYPE_CHECKING:  # the slim server has no torch; ModelVersion is only named here
    from aeserve.models.version import ModelVersion

DEFAULT_K = 10
INT_RANGES = {"int8": (-127, 127), "binary": (0, 255)}  # the values of a stored code, as encode?codes=FORM answers them


def parse_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` items -> (name, path); ValueError naming the item that is not of that form."""
    parsed = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise IndexFileError(f"--index {spec!r}: give NAME=PATH, the model's name and the folder aeserve index wrote")
        parsed.append((name.strip(), path.strip()))
    return parsed


class Indexes:
    """The indexes opened from ``specs`` (``NAME=PATH``), by (name, version); IndexFileError or ValueError names a bad one."""

    def __init__(self, specs: list[str]) -> None:
        self.by_version: dict[tuple[str, int], CodeIndex] = {}
        for name, path in parse_specs(specs):
            index = CodeIndex(path)
            if index.info.model != name:
                raise IndexFileError(f"--index {name}={path}: it indexes codes of {index.info.model}:{index.info.version}, not of {name}")
            key = (name, index.info.version)
            if key in self.by_version:
                raise IndexFileError(f"--index {name}={path}: {name}:{index.info.version} already has the index {self.by_version[key].folder}")
            self.by_version[key] = index

    def __bool__(self) -> bool:
        return bool(self.by_version)

    def find(self, version: ModelVersion) -> CodeIndex:
        """The index of ``version``'s codes: NotFound when it has none, Conflict when it was built with other weights."""
        index = self.by_version.get((version.name, version.version))
        if index is None:
            have = sorted(f"{name}:{number}" for name, number in self.by_version if name == version.name)
            raise NotFound(f"no index of {version.name}:{version.version}'s codes on this server"
                           + (f" (it has {', '.join(have)}; ask that version)" if have else "")
                           + f"; build one with aeserve index {version.name}:{version.version} and start the server with "
                             f"--index {version.name}=PATH")
        if index.info.sha256 != version.manifest.get("sha256"):
            raise Conflict(f"the index {index.folder} holds codes of weights sha256 {index.info.sha256}, {version.name}:{version.version}'s "
                           f"are {version.manifest.get('sha256')}: build the index again from codes this version made")
        return index


def neighbor_count(value: object) -> int:
    """A request's ``k`` (None: DEFAULT_K), checked: a whole number from 1 to MAX_K."""
    if value is None:
        return DEFAULT_K
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer() and 1 <= value <= MAX_K:
        return int(value)
    raise Invalid(f"k must be a whole number from 1 to {MAX_K}; got {value!r}")


def sent_codes(index: CodeIndex, array: np.ndarray, max_rows: int) -> np.ndarray:
    """Codes sent in the index's form (float32, int8 or packed bits, as encode?codes=FORM answers them and the codes
    file holds them), as rows (n, width); Invalid naming the row that is not such a code."""
    info = index.info
    shape = f"{info.width} bytes of packed bits" if info.codes == "binary" else f"{info.code_dim} numbers"
    if array.ndim != 2 or array.shape[1] != info.width:
        raise Invalid(f"codes: the index holds {info.codes} codes of {info.model}:{info.version}, rows of {shape}; "
                      f"got rows of shape {list(array.shape[1:])}")
    rows, _ = validate_rows(array, (info.width,), max_rows, "codes: ", VALUE_RANGE)
    if info.codes in INT_RANGES:
        low, high = INT_RANGES[info.codes]
        bad = ((rows != np.rint(rows)) | (rows < low) | (rows > high)).any(axis=1)
        if bad.any():
            raise Invalid(f"codes: row {int(np.argmax(bad))} holds a value that is not a whole number from {low} to {high}; the index "
                          f"holds {info.codes} codes, as encode?codes={info.codes} answers them")
        return rows.astype(np.int8 if info.codes == "int8" else np.uint8)
    return rows
