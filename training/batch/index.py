"""``aeserve index``: a nearest-neighbour index over the codes an ``aeserve encode`` run stored, kept beside them.

The codes file's metadata says what made its codes; the index is built only for the version it names (the same
number, code_dim and weights), so the server, given the index (``--index NAME=PATH``), answers ``neighbors`` only with
codes of that version. The format is ``models/index.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aeserve.models import index as code_index
from aeserve.models.storage import is_url
from aeserve.training.batch.output import _open, read_metadata
from aeserve.training.data.dataset import DataError

READ_ROWS = 65_536  # codes read and added at a time
# Without --exact or --approximate: exact search for binary codes (Hamming over packed bits is as fast as HNSW) and for
# stores of at most EXACT_ROWS codes (a query then compares them all in about 0.1 ms); HNSW above. Measured in
# docs/benchmarks.md, "Nearest neighbours".
EXACT_ROWS = 10_000


def structure_for(rows: int, codes: str) -> str:
    """The index structure ``aeserve index`` builds by default for ``rows`` codes of form ``codes``."""
    return "flat" if codes == "binary" or rows <= EXACT_ROWS else "hnsw"


def check_codes(path: str, meta: dict, manifest: dict) -> None:
    """DataError when the codes file's metadata names another model, version, code_dim or weights than ``manifest``."""
    name, version = manifest["name"], manifest["version"]
    if meta.get("model") != name:
        raise DataError(f"{path}: its codes were written by {meta.get('model')}:{meta.get('version')}, not by a version of {name}")
    if meta.get("version") != version:
        raise DataError(f"{path}: its codes were written by {name}:{meta.get('version')}, not by {name}:{version}: their codes differ; "
                        f"index them as {name}:{meta.get('version')}, or re-encode them with aeserve encode {name}:{version} "
                        f"--since-version {meta.get('version')} --out {path}")
    if meta.get("code_dim") != manifest["code_dim"]:
        raise DataError(f"{path}: code_dim {meta.get('code_dim')} in its metadata, {name}:{version} has code_dim {manifest['code_dim']}")
    if meta.get("sha256") != manifest.get("sha256"):
        raise DataError(f"{path}: written with weights of sha256 {meta.get('sha256')}, {name}:{version}'s weights are "
                        f"{manifest.get('sha256')}: another registry's version {version}? encode the data again with this one")
    if meta.get("codes") not in code_index.METRICS:
        raise DataError(f"{path}: codes {meta.get('codes')!r} in its metadata; aeserve reads {', '.join(code_index.METRICS)}")


def code_rows(column: pa.Array, info: code_index.IndexInfo) -> np.ndarray:
    """The ``code`` column's values (n, width): float32, int8, or packed bits uint8."""
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width
        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        return data[column.offset * width:(column.offset + len(column)) * width].reshape(-1, width)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, info.width)


def id_values(path: str, ids: pa.Array) -> tuple[str, np.ndarray | list[str]]:
    """("int64", ids) for an integer id column, else ("text", the ids as text); DataError naming a row without an id."""
    if ids.null_count:
        row = int(pc.index(pc.is_null(ids), True).as_py())
        raise DataError(f"{path}: {ids.null_count} rows have no id (the first is row {row}); an index answers an id for every row")
    if pa.types.is_integer(ids.type):
        return "int64", ids.cast(pa.int64()).to_numpy()
    return "text", ids.cast(pa.string()).to_pylist()


def build_index(codes: str, out: str, manifest: dict, structure: str = "auto", overwrite: bool = False) -> code_index.IndexInfo:
    """Index the codes file ``codes`` (written by the version ``manifest`` describes) into the folder ``out``, as
    ``structure`` (hnsw, flat, or auto: ``structure_for``)."""
    if is_url(out):
        raise ValueError(f"--out {out}: the index is a local folder (the server reads it from disk); build it beside a local copy of the codes")
    if not overwrite and Path(out).exists():
        raise DataError(f"{out}: exists; give --overwrite to replace it")
    meta = read_metadata(codes)
    check_codes(codes, meta, manifest)
    with _open(codes, "rb") as f:
        parquet = pq.ParquetFile(f)
        rows = parquet.metadata.num_rows
        info = code_index.IndexInfo(
            model=meta["model"], version=meta["version"], code_dim=meta["code_dim"], codes=meta["codes"], sha256=meta["sha256"],
            rows=rows, structure=structure_for(rows, meta["codes"]) if structure == "auto" else structure, id_column=meta["id"], source=codes,
            scale=meta.get("scale"),
            threshold=meta.get("threshold"), library=code_index.library_version())
        if info.codes == "int8" and info.scale is None or info.codes == "binary" and info.threshold is None:
            raise DataError(f"{codes}: {info.codes} codes without their {'scale' if info.codes == 'int8' else 'threshold'} in the metadata")
        index = code_index.build(info)
        for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=["code"]):
            code_index.add(index, info, code_rows(batch.column(0), info))
        kind, ids = id_values(codes, pq.read_table(f, columns=[meta["id"]]).column(0).combine_chunks())
    info = dataclasses.replace(info, ids=kind)
    code_index.write(out, info, index, ids, overwrite)
    return info


def add_command(sub: argparse._SubParsersAction, registry_help: str) -> None:
    p = sub.add_parser("index", help="build a nearest-neighbour index over a codes file that aeserve encode wrote",
                       description="Index the codes of a Parquet file written by aeserve encode (float, int8 or binary, as its metadata "
                                   "says) into a folder beside it, for aeserve serve --index NAME=PATH. See docs/batch.md.")
    p.add_argument("target", metavar="NAME[:VERSION]", help="the version that wrote the codes")
    p.add_argument("--codes", required=True, metavar="CODES.parquet", help="the codes file (a path or a URL)")
    p.add_argument("--out", required=True, metavar="PATH", help="the index folder to write (local)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="exact search over every code (the default for binary codes and for at most "
                     f"{EXACT_ROWS:,} codes)")
    how.add_argument("--approximate", action="store_true", help=f"an HNSW graph, approximate and far faster on a large store (the default "
                     f"for float and int8 codes above {EXACT_ROWS:,})")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--registry", help=registry_help)
    p.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from aeserve.training.preflight import open_checked, reaching, url_or_none

    name, _, ref = args.target.partition(":")
    registry = open_checked(args.registry)
    with reaching(registry.location):
        manifest = registry.manifest(name, ref or "latest")
    started = time.monotonic()
    with reaching(url_or_none(args.codes)):
        info = build_index(args.codes, args.out, manifest, "flat" if args.exact else "hnsw" if args.approximate else "auto", args.overwrite)
    print(f"indexed {info.rows:,} {info.codes} codes of {info.model}:{info.version} ({info.metric}, {info.structure}) into {args.out} "
          f"in {time.monotonic() - started:.1f} s")
    return 0
