"""``aeserve encode``: the offline batch job, on this machine.

Source blocks are read (and images decoded) by a reader thread while the model runs on the block before and a writer
thread writes the block before that; each block's columns go out as one Parquet row group: what is held is a few blocks, whatever the source's size. Progress
goes to stderr: a bar on a terminal, else one line every few seconds and one at the end.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from aeserve.models.version import ModelVersion
from aeserve.training.batch.encoder import COLUMNS, EXTRAS, Encoder
from aeserve.training.batch.inputs import Block, Source, block_rows, open_source
from aeserve.training.batch.output import CodesWriter, metadata, read_ids, read_metadata, schema
from aeserve.training.data.dataset import DataError

AHEAD = 2  # blocks the reader thread may have ready before the model takes them
LOG_SECONDS = 5.0  # off a terminal: at most one progress line this often


@dataclass
class Result:
    rows: int
    seconds: float
    meta: dict


def ahead(blocks: Iterator[Block], depth: int = AHEAD) -> Iterator[Block]:
    """``blocks`` read by a thread of their own, up to ``depth`` ahead; its exception is raised here, where it was due."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def read() -> None:
        try:
            for block in blocks:
                while not stop.is_set():
                    try:
                        ready.put(block, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            ready.put(e)

    thread = threading.Thread(target=read, name="aeserve-encode-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a reader blocked on a full queue see the stop
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(0.1)


class Progress:
    """Rows done: a tqdm bar on a terminal, else a line now and then (``LOG_SECONDS``) and one at the end."""

    def __init__(self, what: str, total: int | None, enabled: bool = True) -> None:
        self.what, self.total, self.enabled, self.done = what, total, enabled, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rows", desc=what, file=sys.stderr)

    def update(self, rows: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(rows)
        elif self.enabled and time.monotonic() - self.last >= LOG_SECONDS:
            self.last = time.monotonic()
            print(f"{self.what}: {self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        seconds = time.monotonic() - self.start
        of = f"/{self.total:,}" if self.total is not None else ""
        return f"{self.done:,}{of} rows, {self.done / max(seconds, 1e-9):,.0f} rows/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def encode_to_parquet(encoder: Encoder, data: str, out: str, id_column: str | None = None, overwrite: bool = False,
                      progress: bool = True, keep: pa.Array | None = None, answers: Answers | None = None) -> Result:
    """Encode every row of ``data`` with ``encoder`` into the codes file ``out``; with ``keep`` (ids), only the rows
    whose id is among them, each of which must be found. ``answers`` runs the model on the blocks elsewhere (on Ray
    actors: ``ray_engine.py``), in order; by default ``encoder`` runs them here."""
    version = encoder.version
    source = open_source(data, version, id_column)
    columns = [COLUMNS[name] for name in encoder.call.outputs[1:]]
    meta = metadata(version, encoder.codes, source.id_name, encoder.extras, data)
    file_schema = schema(version, encoder.codes, source.id_name, source.id_type, columns, meta)
    total = len(keep) if keep is not None else source.rows
    bar = Progress(f"encode {version.name}:{version.version}", total, progress)
    writer = CodesWriter(out, file_schema, overwrite)
    start = time.monotonic()
    # Three stages at once: the reader thread reads block k + 1 while the model runs on block k and a writer thread
    # writes block k - 1 (pyarrow and torch let go of the GIL, so they overlap on the cores).
    writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aeserve-encode-writer")
    pending: Future | None = None
    try:
        for block, answer in (answers or here(encoder))(ahead(_kept(source, block_rows(version), keep))):
            if pending is not None:
                pending.result()
            pending = writing.submit(writer.write, {source.id_name: block.ids, **answer})
            bar.update(len(block.rows))
        if pending is not None:
            pending.result()
        if keep is not None and writer.rows != len(keep):
            raise DataError(f"{data}: {len(keep) - writer.rows} of the store's {len(keep)} ids are not in the data (ids "
                            f"{_absent(keep, out, source.id_name, data, version)}); re-encode from the data the store was made from")
        writer.commit()
    except BaseException:
        writing.shutdown(wait=True)  # a write in flight ends before its file goes
        writer.abort()
        raise
    finally:
        writing.shutdown(wait=True)
        bar.close()
    seconds = time.monotonic() - start
    if progress and bar.bar is None:
        print(f"{bar.what}: {bar.line()}", file=sys.stderr, flush=True)
    return Result(writer.rows, seconds, meta)


# Blocks -> (block, its columns) in order: where the model runs.
Answers = Callable[[Iterator[Block]], Iterator[tuple[Block, dict]]]


def here(encoder: Encoder) -> Answers:
    """The model on this machine, block after block (torch uses every core on each)."""
    return lambda blocks: ((block, encoder.columns(block.rows)) for block in blocks)


def _kept(source: Source, size: int, keep: pa.Array | None) -> Iterator[Block]:
    for block in source.blocks(size):
        if keep is None:
            yield block
            continue
        mask = pc.is_in(block.ids, value_set=keep.cast(block.ids.type)).to_numpy(zero_copy_only=False)
        if mask.any():
            yield Block(block.ids.filter(pa.array(mask)), block.rows[mask])


def _absent(keep: pa.Array, out: str, id_name: str, data: str, version: ModelVersion) -> str:
    """A few of the store's ids that the data lacks, for the message (read again: the error is rare, the ids are many)."""
    source = open_source(data, version, None if id_name in ("row", "path") else id_name)
    seen = pa.chunked_array([b.ids for b in source.blocks(block_rows(version))] or [pa.array([], keep.type)])
    absent = keep.filter(pc.invert(pc.is_in(keep, value_set=seen.combine_chunks().cast(keep.type))))
    return ", ".join(map(repr, absent.slice(0, 3).to_pylist())) + (" ..." if len(absent) > 3 else "")


def add_command(sub: argparse._SubParsersAction, registry_help: str) -> None:
    p = sub.add_parser("encode", help="encode a data set into a Parquet file of codes (the offline batch job)",
                       description="Encode every row of a table, an array or an image folder with a version's own preprocessing, into "
                                   "Parquet: an id column and a fixed-size code column, with the model, version, code_dim, codes form "
                                   "and weights' sha256 in the schema metadata. See docs/batch.md.")
    p.add_argument("target", metavar="NAME[:VERSION]")
    p.add_argument("--data", metavar="PATH_OR_URL", help="a table (.csv/.tsv/.parquet), an array (.npy/.npz) or an image folder; "
                   "with --since-version, the data the store was made from (default: as its metadata names it)")
    p.add_argument("--out", required=True, metavar="PATH_OR_URL", help="the Parquet file to write (a path, or a URL such as s3://bucket/codes.parquet)")
    p.add_argument("--id", dest="id_column", metavar="COLUMN", help="a table's key column, carried through (default: the row number; "
                   "for images the file's path in the folder)")
    p.add_argument("--codes", choices=["float", "int8", "binary"], default=None,
                   help="the codes' form: float32 (default), or int8 or binary with the version's stored quantization")
    p.add_argument("--with", dest="extras", default=None, metavar="reconstruct,project",
                   help="also write: reconstruct (errors, scores, percentiles), project (2-D coordinates)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where the model runs: this machine (default), or "
                   "actors on a Ray cluster, $RAY_ADDRESS's or a local one (pip install 'aeserve[ray]'); reading and writing stay here")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--since-version", type=int, metavar="N", help="re-encode the store at --out, written by version N or earlier of "
                   "NAME, with NAME[:VERSION]: the same ids, id column, codes form and --with unless given; replaces it when done")
    p.add_argument("--registry", help=registry_help)
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    from aeserve.training.preflight import open_checked, reaching, url_or_none

    name, _, ref = args.target.partition(":")
    extras = tuple(e.strip() for e in args.extras.split(",") if e.strip()) if args.extras else None
    registry = open_checked(args.registry)
    with reaching(registry.location):
        loaded = registry.load(name, ref or "latest")
    keep, overwrite, data, id_column, codes = None, args.overwrite, args.data, args.id_column, args.codes
    if args.since_version is not None:
        with reaching(url_or_none(args.out)):
            store = read_metadata(args.out)
            if store["model"] != loaded.name:
                raise DataError(f"{args.out}: its codes were written by {store['model']}:{store['version']}, not by a version of {loaded.name}")
            if store["version"] == loaded.version:
                print(f"{args.out}: already written by {loaded.name}:{loaded.version}; nothing to re-encode", file=sys.stderr)
                return 0
            if store["version"] > args.since_version:
                raise DataError(f"{args.out}: written by {store['model']}:{store['version']}, after --since-version {args.since_version}; "
                                f"give --since-version {store['version']} to re-encode it")
            keep = read_ids(args.out, store["id"])
        data = data or store.get("data")
        stored_id = None if store["id"] in ("row", "path") else store["id"]
        if id_column is not None and id_column != stored_id:
            raise DataError(f"{args.out}: its ids are in column {store['id']!r}; --id {id_column} would not find them")
        id_column, codes = stored_id, codes or store["codes"]
        extras = store.get("with", []) if extras is None else extras
        overwrite = True  # the store is replaced once its re-encoding is complete
    if not data:
        raise ValueError("aeserve encode needs --data PATH_OR_URL")
    encoder = Encoder(loaded=loaded, codes=codes or "float", extras=tuple(extras or ()))
    answers = None
    if args.engine == "ray":
        from aeserve.training.batch.ray_engine import RayActors

        answers = RayActors(registry.location, loaded, encoder.codes, encoder.extras).answers
    with reaching(url_or_none(data), url_or_none(args.out)):
        result = encode_to_parquet(encoder, data, args.out, id_column, overwrite, not args.quiet, keep, answers)
    what = f" (re-encoded from version {store['version']})" if args.since_version is not None else ""
    print(f"wrote {result.rows:,} codes of {loaded.name}:{loaded.version} to {args.out}{what} in {result.seconds:.1f} s "
          f"({result.rows / max(result.seconds, 1e-9):,.0f} rows/s)")
    return 0


__all__ = ["EXTRAS", "add_command", "cmd_encode", "encode_to_parquet"]
