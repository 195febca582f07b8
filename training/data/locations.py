"""Where data lives: a local path, or a file or folder in object storage read through fsspec.

``data.path`` may be a URL (``s3://``, ``gs://``, any fsspec filesystem) for arrays, tables and image folders: read
through fsspec as it is needed, never copied whole to disk first.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from aeserve.models.storage import install_hint, is_url, local_path
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError

REMOTE_BLOCK_BYTES = 8 * 2**20  # what one read of a table or archive from a URL fetches (ahead, for sequential reads)
HEADER_BYTES = 64 * 2**10  # what a read of a header (.npy, zip member, CSV header line) from a URL fetches
GAP_BYTES = 64 * 2**10  # rows of a gather at most this far apart are fetched as one range: cheaper than another request


@dataclass(frozen=True)
class RemoteFile:
    """A file or folder in object storage, read through fsspec; messages name it by its URL."""

    url: str
    fs: Any
    path: str  # fsspec's path: the URL without its scheme

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    def child(self, relative: str) -> RemoteFile:
        return RemoteFile(f"{self.url}/{relative}", self.fs, f"{self.path}/{relative}")

    def info(self) -> dict[str, Any] | None:
        """What the store says of the object (size, type, ETag, …), or None when nothing is there."""
        try:
            return self.fs.info(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"{self.url}: cannot be read ({e})") from None

    def open(self, mode: str = "rb", **kwargs: Any):
        return self.fs.open(self.path, mode, **kwargs)

    def read_ranges(self, starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges [start, end) of the file, fetched concurrently where the store allows (fsspec's cat_ranges)."""
        try:
            parts = self.fs.cat_ranges([self.path] * len(starts), starts, ends, on_error="raise")
        except OSError as e:
            raise DataError(f"{self.url}: cannot be read ({e})") from None
        for part, start, end in zip(parts, starts, ends, strict=True):
            if len(part) != end - start:
                raise DataError(f"{self.url}: truncated: bytes {start}..{end} asked for, {len(part)} there")
        return parts

    def identity(self) -> str:
        """Names the object's content without reading it whole (hashing it would download it a second time): its size,
        its ETag or checksum as the store reports it (on S3 and GCS a hash of the content), else its modification time,
        and the sha256 of its first and last HEADER_BYTES."""
        info = self.info() or {}
        size = int(info.get("size") or 0)
        content = [key for key in ("ETag", "etag", "md5Hash", "crc32c") if info.get(key)]
        facts = {key: str(info[key]) for key in ["size", *(content or [k for k in ("LastModified", "mtime", "updated", "created") if k in info])]
                 if key in info}
        ends = self.read_ranges([0, max(0, size - HEADER_BYTES)], [min(size, HEADER_BYTES), size])
        return json.dumps(facts, sort_keys=True) + hashlib.sha256(b"".join(ends)).hexdigest()


def location(path: str) -> Path | RemoteFile:
    """A local path (also from a ``file://`` URL), or a file or folder in object storage."""
    if not is_url(path):
        return Path(local_path(path))
    import fsspec

    url = path.rstrip("/")
    try:
        # No listings cache: what the store holds now, never a listing this process made earlier (s3fs would take a
        # file missing from a cached listing of its folder for a file that is not there).
        fs, fs_path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError, TypeError) as e:  # the scheme's package is not installed, or fsspec does not know it
        raise DataError(f"{url}: cannot be read ({e}){install_hint(url)}") from None
    return RemoteFile(url, fs, fs_path.rstrip("/"))


class Found(Enum):
    """What a path names: a file, a folder, or nothing (a store's other object types count as nothing)."""

    FILE = "file"
    FOLDER = "directory"  # fsspec's word, which ``info()["type"]`` reports
    NOTHING = "nothing"


def found_at(where: Path | RemoteFile) -> Found:
    """What ``where`` names, on the local disk or as the store reports it."""
    if isinstance(where, Path):
        return Found.FILE if where.is_file() else Found.FOLDER if where.is_dir() else Found.NOTHING
    reported = (where.info() or {}).get("type")
    return Found(reported) if reported in (Found.FILE.value, Found.FOLDER.value) else Found.NOTHING


def open_file(where: Path | RemoteFile, block_size: int = REMOTE_BLOCK_BYTES):
    """A binary file object; from a URL each read fetches at least ``block_size`` bytes (fsspec's read-ahead cache)."""
    return where.open("rb") if isinstance(where, Path) else where.open("rb", block_size=block_size)


@contextmanager
def opened(where: Path | RemoteFile) -> Iterator[Path | Any]:
    """What a reader that takes a path or a file (zipfile, pyarrow) gets: a local file's path, which it opens itself
    (pyarrow natively), or an fsspec file object, read by range requests REMOTE_BLOCK_BYTES at a time."""
    if isinstance(where, Path):
        yield where
    else:
        with open_file(where) as f:
            yield f


def child(folder: Path | RemoteFile, relative: str) -> Path | RemoteFile:
    """The file or folder at ``relative`` (a path with slashes) inside ``folder``."""
    return folder / relative if isinstance(folder, Path) else folder.child(relative)


def require_file(config: DataConfig) -> Path | RemoteFile:
    """data.path as a local file or a file at a URL, or a DataError saying why it is neither."""
    return required(config, Found.FILE, "a file")


def required(config: DataConfig, wanted: Found, what: str, layout: str = "") -> Path | RemoteFile:
    """data.path, local or at a URL, when it is a ``wanted`` (a file or a folder: ``what``, say "a folder of images");
    else a DataError that names it and says what it is. ``layout`` follows the message for what is found instead."""
    if not config.path:
        raise DataError(f"data.source {config.source!r} needs data.path ({what})")
    where = location(config.path)
    found = found_at(where)
    if found is Found.NOTHING:
        raise DataError(f"{where}: {'file' if wanted is Found.FILE else 'folder'} not found")
    if found is not wanted:
        raise DataError(f"{where}: is a {'file' if found is Found.FILE else 'directory'}; data.source {config.source!r} needs {what}{layout}")
    return where
