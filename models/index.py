"""A nearest-neighbour index over stored codes: a folder beside the codes file, built by ``aeserve index``, searched by
the server's ``neighbors`` operation. Torch-free and pyarrow-free, so a slim server can search it.

The folder (written whole, then renamed into place by ``write``):

    index.json    what the codes are: model, version, code_dim, codes form, the weights' sha256, rows, metric, structure
    index.faiss   the faiss index over the codes, rows in the codes file's order
    ids.npy       the codes file's ids: int64; or, for text ids, ids.npy holds the UTF-8 bytes' offsets (rows + 1,
                  int64) and ids-text.npy the bytes (uint8)

The index keeps each form's own distance (faiss, https://github.com/facebookresearch/faiss):

- float: Euclidean distance between the float32 codes (IndexFlatL2, or IndexHNSWFlat);
- int8: Euclidean distance between scale * q, the version's stored quantization, one byte a value: faiss's 8-bit
  scalar quantizer stores (x - vmin) / vdiff * 255 truncated, so vmin = -127.5 * scale and vdiff = 255 * scale store
  q + 127 and read back scale * q (to float32 rounding), with no quantizer fitted of its own (IndexScalarQuantizer, or IndexHNSWSQ);
- binary: Hamming distance between the packed bits (semantic hashing; IndexBinaryFlat, or IndexBinaryHNSW): the last
  byte's unused bits are 0 in every code, so they add nothing.

A query is a float code (what encode answers: the int8 index compares it with scale * q as it is, the binary index
takes its bits against the stored threshold) or a code in the index's own form, as the codes file holds them.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
INFO, INDEX, IDS, ID_TEXT = "index.json", "index.faiss", "ids.npy", "ids-text.npy"
METRICS = {"float": "l2", "int8": "l2", "binary": "hamming"}
STRUCTURES = ("hnsw", "flat")
MAX_K = 1000  # the most neighbours one query asks for
# HNSW (Malkov & Yashunin 2018): links per node, and the candidate lists of building and searching. How they were
# chosen: docs/benchmarks.md, "Nearest neighbours".
HNSW_LINKS, EF_CONSTRUCTION, EF_SEARCH = 32, 80, 64


class IndexFileError(ValueError):
    """An index folder that cannot be read, or codes it cannot hold; the message names the folder or the codes."""


@dataclass(frozen=True)
class IndexInfo:
    """index.json: what the indexed codes are and how they are searched."""

    model: str
    version: int
    code_dim: int
    codes: str  # float | int8 | binary
    sha256: str | None  # of the version's weights
    rows: int
    structure: str = "hnsw"  # hnsw | flat (exact)
    ids: str = "int64"  # int64 | text
    id_column: str = "row"
    source: str = ""  # the codes file it was built from
    hnsw: dict[str, int] = field(default_factory=lambda: {"links": HNSW_LINKS, "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH})
    scale: list[float] | None = None  # int8: code ~ scale * q
    threshold: list[float] | None = None  # binary: bit d is code_d > threshold_d
    library: str = ""
    format: int = FORMAT

    @property
    def metric(self) -> str:
        return METRICS[self.codes]

    @property
    def width(self) -> int:
        """Values in one stored code: code_dim, or its bytes of packed bits."""
        return -(-self.code_dim // 8) if self.codes == "binary" else self.code_dim


def _faiss():
    import faiss

    return faiss


def build(info: IndexInfo) -> Any:
    """An empty faiss index for ``info``'s codes; ``add`` fills it."""
    faiss = _faiss()
    d, links, hnsw = info.code_dim, info.hnsw["links"], info.structure == "hnsw"
    if info.codes == "binary":
        index = faiss.IndexBinaryHNSW(info.width * 8, links) if hnsw else faiss.IndexBinaryFlat(info.width * 8)
    elif info.codes == "int8":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, links) if hnsw else faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit)
        storage = faiss.downcast_index(index.storage) if hnsw else index
        scale = np.asarray(info.scale, dtype=np.float32)
        faiss.copy_array_to_vector(np.concatenate([-127.5 * scale, 255 * scale]).astype(np.float32), storage.sq.trained)
        storage.is_trained = index.is_trained = True
    else:
        index = faiss.IndexHNSWFlat(d, links) if hnsw else faiss.IndexFlatL2(d)
    if hnsw:
        index.hnsw.efConstruction = info.hnsw["ef_construction"]
    return index


def add(index: Any, info: IndexInfo, codes: np.ndarray) -> None:
    """Add ``codes`` (n, width) as the codes file holds them (float32, int8, or packed bits uint8) after the rows already in."""
    if codes.shape[1:] != (info.width,):
        raise IndexFileError(f"codes of shape {codes.shape[1:]} a row; {info.codes} codes of code_dim {info.code_dim} are ({info.width},)")
    if info.codes == "binary":
        index.add(np.ascontiguousarray(codes, dtype=np.uint8))
    elif info.codes == "int8":
        index.add(codes.astype(np.float32) * np.asarray(info.scale, dtype=np.float32))  # stored as q + 127 again, exactly
    else:
        index.add(np.ascontiguousarray(codes, dtype=np.float32))


def write(out: str | os.PathLike[str], info: IndexInfo, index: Any, ids: np.ndarray | list[str], overwrite: bool = False) -> None:
    """Write the folder ``out`` whole: into a hidden folder beside it, synced, then renamed into place. ``ids``: int64
    (rows,), or texts. An existing ``out`` is an error unless ``overwrite``; then it is replaced once the new one is complete."""
    faiss, final = _faiss(), Path(out)
    if final.exists() and not overwrite:
        raise IndexFileError(f"{out}: exists; give --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    temporary.mkdir()
    try:
        (faiss.write_index_binary if info.codes == "binary" else faiss.write_index)(index, str(temporary / INDEX))
        if info.ids == "text":
            encoded = [str(i).encode() for i in ids]
            np.save(temporary / IDS, np.concatenate([[0], np.cumsum([len(b) for b in encoded], dtype=np.int64)]).astype(np.int64))
            np.save(temporary / ID_TEXT, np.frombuffer(b"".join(encoded), dtype=np.uint8))
        else:
            np.save(temporary / IDS, np.asarray(ids, dtype=np.int64))
        (temporary / INFO).write_text(json.dumps(asdict(info), indent=1) + "\n")
        for path in temporary.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # --overwrite: the old folder goes only once the new one is complete
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
            final.rename(old)
            temporary.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temporary.rename(final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class Ids:
    """The ids of an index's rows, memory-mapped: ``take(rows)`` (any shape of row numbers) -> nested lists of ids."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.ids = np.load(folder / IDS, mmap_mode="r", allow_pickle=False)
        self.text = np.load(folder / ID_TEXT, mmap_mode="r", allow_pickle=False) if kind == "text" else None

    def __len__(self) -> int:
        return len(self.ids) - 1 if self.text is not None else len(self.ids)

    def take(self, rows: np.ndarray) -> list:
        if self.text is None:
            return np.asarray(self.ids[rows.ravel()]).reshape(rows.shape).tolist()
        start, stop = np.asarray(self.ids[rows]), np.asarray(self.ids[rows + 1])
        return [[bytes(self.text[a:b]).decode() for a, b in zip(s, e, strict=True)] for s, e in zip(start, stop, strict=True)]


class CodeIndex:
    """An index folder, opened: ``search`` float codes or codes in its form for the k nearest rows' ids and distances."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        folder = self.folder = Path(path)
        try:
            raw = json.loads((folder / INFO).read_text())
            self.info = IndexInfo(**raw)
        except FileNotFoundError:
            raise IndexFileError(f"{path}: no {INFO}; give the folder that aeserve index wrote") from None
        except (ValueError, TypeError) as e:
            raise IndexFileError(f"{path}/{INFO}: not an aeserve index description ({e})") from None
        if self.info.format != FORMAT or self.info.codes not in METRICS or self.info.structure not in STRUCTURES:
            raise IndexFileError(f"{path}/{INFO}: format {self.info.format}, codes {self.info.codes!r}, structure "
                                 f"{self.info.structure!r}: this aeserve reads format {FORMAT}, codes {'/'.join(METRICS)}")
        faiss = _faiss()
        try:
            self.index = (faiss.read_index_binary if self.info.codes == "binary" else faiss.read_index)(str(folder / INDEX))
            self.ids = Ids(folder, self.info.ids)
        except (RuntimeError, OSError, ValueError) as e:
            raise IndexFileError(f"{path}: its index or ids cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if self.index.ntotal != self.info.rows or len(self.ids) != self.info.rows:
            raise IndexFileError(f"{path}: {INFO} says {self.info.rows} rows, the index holds {self.index.ntotal} and the ids {len(self.ids)}")

    def queries(self, codes: np.ndarray, form: str) -> np.ndarray:
        """Codes (n, code_dim) float32 (``form`` "float"), or (n, width) in the index's form, as the index takes them."""
        info = self.info
        if info.codes == "binary":
            return np.packbits(codes > np.asarray(info.threshold, dtype=np.float32), axis=1) if form == "float" else codes.astype(np.uint8)
        if form == "int8":
            return codes.astype(np.float32) * np.asarray(info.scale, dtype=np.float32)
        return np.ascontiguousarray(codes, dtype=np.float32)

    def search(self, codes: np.ndarray, form: str, k: int) -> tuple[list, np.ndarray]:
        """(ids (n, k') as nested lists, distances (n, k') float32): the k nearest rows, nearest first; k' = min(k, rows).
        Distances are Euclidean for float and int8 codes, bits that differ for binary codes."""
        k = min(k, self.info.rows)
        # Per call, not on the index: searches run in several threads at once. A candidate list of at least k finds k.
        params = _faiss().SearchParametersHNSW(efSearch=max(self.info.hnsw["ef_search"], k)) if self.info.structure == "hnsw" else None
        distances, rows = self.index.search(self.queries(codes, form), k, params=params)
        if (rows < 0).any():
            raise RuntimeError(f"{self.folder}: the search found fewer than {k} of {self.info.rows} rows")
        if self.info.metric == "l2":  # faiss answers squared distances
            distances = np.sqrt(np.maximum(distances, 0))
        return self.ids.take(rows), distances.astype(np.float32)


def library_version() -> str:
    return f"faiss-cpu {_faiss().__version__}"
