"""What the offline commands check before any work (the registry, the folders they write, a store they reach), and
how a failure that is the user's becomes one line naming the place: the errors, the OSErrors, a closed stdout."""
from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aeserve.models.files import CheckpointError
from aeserve.models.registry import NotFoundError, Registry, RegistryError, check_name, open_registry
from aeserve.models.storage import is_url
from aeserve.training.data.dataset import DataError

# Errors a user can fix: printed as one line, exit status 2.
USER_ERRORS = (ValueError, NotFoundError, DataError, CheckpointError, RegistryError, RuntimeError)
# OSErrors that say what is wrong with a place the user chose or its machine (a file where a folder belongs, a
# read-only or full disk, a permission, a store that cannot be reached): one line, exit status 2. Any other OSError
# (a bad file descriptor, an invalid argument) is a bug, and keeps its traceback.
USER_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOENT, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV, errno.EMLINK, errno.ETXTBSY,
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.EHOSTDOWN, errno.ENETDOWN,
})


class StoreError(RuntimeError):
    """Object storage (or a local disk) failed without naming what it failed on; the message names the place."""


def not_a_directory(path: str | None, what: str) -> str | None:
    """``path`` unchanged, or a ValueError when it names a folder where a file is expected."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{path}: is a directory; expected {what}")
    return path


def writable_folder(path: str | os.PathLike[str], what: str) -> None:
    """Check, writing nothing, that ``path`` is a folder this process can write in or can create; a ValueError if not."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:  # stops at "." or "/"
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"{existing} is a file"
        raise ValueError(f"{path}: {where}; expected {what}")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # unnamed (O_TMPFILE): nothing shows in the folder, even for a moment
    except OSError as e:
        where = "cannot write in it" if existing == path else f"cannot create it in {existing}"
        raise ValueError(f"{path}: {where} ({e.strerror}); expected {what}") from None


def store_client_error(e: BaseException) -> bool:
    """Whether ``e`` is an object store client's failure to sign in or connect (botocore, google-auth), not a bug."""
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None and isinstance(e, (botocore.BotoCoreError, botocore.ClientError)):
        return not isinstance(e, botocore.ParamValidationError)
    google_auth = sys.modules.get("google.auth.exceptions")
    return google_auth is not None and isinstance(e, google_auth.GoogleAuthError)


@contextmanager
def reaching(*places: str | os.PathLike[str] | None) -> Iterator[None]:
    """Name ``places`` in the errors that name nothing: a store's client failing to sign in or connect, an OSError
    without a path (a full disk on a write, a refused connection, a store's 'bucket does not exist').

    ``places`` are the URLs read or written, and the local folders written to (a disk fills up while writing).
    """
    urls = [str(p) for p in places if p and is_url(str(p))]
    folders = [str(p) for p in places if p and not is_url(str(p))]
    try:
        yield
    except OSError as e:
        if e.filename is not None or isinstance(e, BrokenPipeError):
            raise
        # A local disk fails without a path on a write (ENOSPC, EDQUOT, EIO); any other pathless OSError is a store's.
        named = (folders or urls) if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) else urls
        if not named or (not urls and e.errno not in USER_ERRNOS):
            raise
        raise StoreError(f"{' or '.join(named)}: {e.strerror or e}") from e
    except Exception as e:
        if not urls or not store_client_error(e):
            raise
        raise StoreError(f"{' or '.join(urls)}: {e}") from e


def url_or_none(path: str | None) -> str | None:
    """``path`` when it is a URL (data read from a store names it in errors); a local file read names itself."""
    return path if path and is_url(path) else None


def open_checked(location: str | None, name: str | None = None) -> Any:
    """The registry at ``location``, checked before any work is done: a local one is a folder, writable for ``name``'s
    new versions when ``name`` is given; a store's is listed (signing in, connecting) and its bucket exists."""
    registry = open_registry(location)
    if isinstance(registry, Registry):
        if name is not None:
            writable_folder(registry.root / check_name(name), "a writable folder for the registry")
        elif registry.root.exists() and not registry.root.is_dir():
            raise ValueError(f"{registry.root}: is a file; expected a folder for the registry")
        return registry
    with reaching(registry.location):
        registry.listing(fresh=True)
        if registry.protocol in ("s3", "s3a", "gs", "gcs"):
            try:
                registry.fs.info(registry.root.split("/")[0])
            except FileNotFoundError:  # s3fs lists a missing bucket as empty; publishing to it would fail after training
                raise StoreError(f"{registry.location}: the bucket does not exist") from None
            except OSError:  # listed, but asking about the bucket itself is not allowed: publishing may still work
                pass
    return registry


def os_error_line(e: OSError) -> str:
    """One line for an OSError that is the user's: the path it names and what is wrong there."""
    if isinstance(e, IsADirectoryError):  # a folder where a file is expected, wherever it was opened
        return f"{e.filename}: is a directory; expected a file"
    if e.filename is None:
        return str(e.strerror or e)
    path = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    if isinstance(e, NotADirectoryError):  # name the file that stands where a folder should be
        blocking = next((p for p in Path(str(e.filename)).parents if p.is_file()), None)
        if blocking is not None:
            return f"{path}: {blocking} is a file, not a folder"
    if isinstance(e, FileExistsError) and Path(str(e.filename)).is_file():
        return f"{path}: is a file, not a folder"
    return f"{path}: {e.strerror}"


def stdout_closed() -> int:
    """Exit quietly when the reader of stdout went away (``aeserve models | head -1``), as a command killed by SIGPIPE would.

    stdout then points at /dev/null, so that flushing it at exit raises nothing more (Python docs, "Note on SIGPIPE").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file here (captured in a test, say): nothing left to flush
        pass
    return 128 + signal.SIGPIPE
