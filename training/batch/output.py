"""The codes file: Parquet, an id column and a fixed-size ``code`` column, with what made it in its schema metadata.

Written row group by row group (``pyarrow.parquet.ParquetWriter``) to a temporary name beside the final one, which it
takes only once complete: a run that fails or is killed leaves nothing under the final name. Locally the temporary
file is hidden in the same folder and renamed into place (atomic); at a URL it is written under a temporary key and
moved with fsspec (on object storage a copy that appears whole), its temporary key removed when a run fails.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aeserve.models.storage import install_hint, is_url, local_path
from aeserve.models.version import ModelVersion
from aeserve.training.data.dataset import DataError

METADATA_KEY = b"aeserve"  # the schema metadata's key; its value is JSON (see ``metadata``)


def code_type(version: ModelVersion, codes: str) -> pa.DataType:
    """The ``code`` column's type: fixed-size lists of float32 or int8 (code_dim), or code_dim bits packed into bytes."""
    if codes == "binary":
        return pa.binary(-(-version.code_dim // 8))
    return pa.list_(pa.float32() if codes == "float" else pa.int8(), version.code_dim)


def schema(version: ModelVersion, codes: str, id_name: str, id_type: pa.DataType, columns: list[str], meta: dict[str, Any]) -> pa.Schema:
    """The file's schema: the id, the code, then ``columns`` (errors, scores, percentiles: float32; coordinates: 2 of them)."""
    fields = [pa.field(id_name, id_type), pa.field("code", code_type(version, codes), nullable=False)]
    for name in columns:
        fields.append(pa.field(name, pa.list_(pa.float32(), 2) if name == "coordinates" else pa.float32(), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def metadata(version: ModelVersion, codes: str, id_name: str, extras: tuple[str, ...], data: str) -> dict[str, Any]:
    """What made the codes: the model, its version, code_dim, the codes' form (with the int8 scale or the binary
    threshold that reads them), the weights' sha256, the id column, --with and the source."""
    meta = {"model": version.name, "version": version.version, "code_dim": version.code_dim, "codes": codes,
            "sha256": version.manifest.get("sha256"), "id": id_name, "with": list(extras), "data": data}
    if codes != "float":
        meta.update({key: value.tolist() for key, value in version.code_quantization.constants(codes).items()})
    return meta


def numbers_array(values: np.ndarray, kind: pa.DataType | None = None) -> pa.Array:
    """A 1-D numpy array of numbers as an Arrow array of ``kind`` (default: its own type), on its buffer without a copy.

    Not ``pa.array``: its first call imports pandas where pandas is installed (about 0.15 s, in the reader thread while
    the model waits for its first block), and this needs nothing of it."""
    kind = kind or pa.from_numpy_dtype(values.dtype)
    values = np.ascontiguousarray(values, dtype=kind.to_pandas_dtype())
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def arrow_column(name: str, values: np.ndarray, field: pa.Field) -> pa.Array:
    """Values (n, ...) from ``Encoder.columns`` as the field's Arrow type, without a copy where the layout allows."""
    if pa.types.is_fixed_size_binary(field.type):
        return pa.FixedSizeBinaryArray.from_buffers(field.type, len(values), [None, pa.py_buffer(np.ascontiguousarray(values))])
    if pa.types.is_fixed_size_list(field.type):
        flat = np.ascontiguousarray(values).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(numbers_array(flat, field.type.value_type), field.type.list_size)
    return numbers_array(values, pa.float32())


def read_metadata(path: str) -> dict[str, Any]:
    """A codes file's metadata (``metadata``'s dict), checked against its ``code`` column; a DataError says what is wrong."""
    try:
        with _open(path, "rb") as f:
            file_schema = pq.ParquetFile(f).schema_arrow
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    raw = (file_schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: no aeserve metadata in its schema; it was not written by aeserve encode")
    meta = json.loads(raw)
    if "code" not in file_schema.names:
        raise DataError(f"{path}: no code column")
    kind = file_schema.field("code").type
    width = kind.byte_width * 8 if pa.types.is_fixed_size_binary(kind) else getattr(kind, "list_size", None)
    expected = -(-meta["code_dim"] // 8) * 8 if meta.get("codes") == "binary" else meta["code_dim"]
    if width != expected:
        raise DataError(f"{path}: its code column holds {width} values a row ({kind}), its metadata says code_dim {meta['code_dim']}")
    return meta


def read_ids(path: str, id_name: str) -> pa.Array:
    """A codes file's id column."""
    with _open(path, "rb") as f:
        return pq.read_table(f, columns=[id_name]).column(id_name).combine_chunks()


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"{url}: cannot be written ({e}){install_hint(url)}") from None


def _open(path: str, mode: str):
    if not is_url(path):
        return open(local_path(path), mode)
    fs, where = _filesystem(path)
    return fs.open(where, mode)


def exists(path: str) -> bool:
    if not is_url(path):
        return Path(local_path(path)).exists()
    fs, where = _filesystem(path)
    return fs.exists(where)


class CodesWriter:
    """A codes file being written: ``write`` a block's columns, then ``commit`` (the file takes its final name) or
    ``abort`` (nothing is left). ``overwrite``: replace a file already under the final name (else an error, checked
    when opened and again at commit)."""

    def __init__(self, out: str, schema: pa.Schema, overwrite: bool = False) -> None:
        self.out, self.schema, self.overwrite = out, schema, overwrite
        if not overwrite and exists(out):
            raise DataError(f"{out}: exists; give --overwrite to replace it")
        tag = uuid.uuid4().hex[:12]
        if is_url(out):
            self.fs, self.final = _filesystem(out)
            self.temporary = f"{self.final}.tmp-{tag}"
            self._file = self.fs.open(self.temporary, "wb")
        else:
            final = Path(local_path(out))
            if final.is_dir():
                raise DataError(f"{out}: is a directory; --out names the Parquet file to write")
            final.parent.mkdir(parents=True, exist_ok=True)
            self.fs, self.final = None, final
            self.temporary = final.with_name(f".{final.name}.tmp-{tag}")
            self._file = open(self.temporary, "wb")
        # No dictionaries (codes and keys repeat seldom, and building one costs ten times the write) and statistics on
        # the id alone (what a reader filters by).
        self._writer = pq.ParquetWriter(self._file, schema, use_dictionary=False, write_statistics=[schema.names[0]])
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray | pa.Array]) -> None:
        """One row group: the columns of one or more blocks, by field name."""
        arrays = [value if isinstance(value, pa.Array) else arrow_column(field.name, value, field)
                  for field, value in ((field, columns[field.name]) for field in self.schema)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(1, len(table)))
        self.rows += len(table)

    def commit(self) -> None:
        self._writer.close()
        if self.fs is None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.overwrite:
                os.replace(self.temporary, self.final)
            else:
                try:
                    os.link(self.temporary, self.final)  # fails, rather than replacing, where a file appeared meanwhile
                except FileExistsError:
                    self.temporary.unlink(missing_ok=True)
                    raise DataError(f"{self.out}: appeared while encoding; give --overwrite to replace it") from None
                self.temporary.unlink()
            return
        self._file.close()
        if not self.overwrite and self.fs.exists(self.final):
            self.fs.rm(self.temporary)
            raise DataError(f"{self.out}: appeared while encoding; give --overwrite to replace it")
        self.fs.mv(self.temporary, self.final)

    def abort(self) -> None:
        """Drop what was written; nothing is left under the final name or the temporary one."""
        try:
            self._writer.close()
            self._file.close()
        except Exception:  # noqa: BLE001  (a failing write may leave the writer unusable; the file goes anyway)
            pass
        if self.fs is None:
            self.temporary.unlink(missing_ok=True)
        else:
            try:
                self.fs.rm(self.temporary)
            except FileNotFoundError:
                pass
