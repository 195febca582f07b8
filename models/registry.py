"""The on-disk registry: ``<root>/<name>/<version>/{manifest.json,weights.safetensors}``.

Versions are positive integers and never change once published; a version is
written to a temporary folder, synced, then renamed into place, so a reader
never sees half of one. ``<root>/<name>/aliases.json`` maps alias -> version,
with ``latest`` kept at the highest version.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from aeserve.models.files import MANIFEST, WEIGHTS, CheckpointError, listing, sha256_bytes
from aeserve.models.storage import install_hint, is_url, local_path, registry_location

if TYPE_CHECKING:
    import torch

    from aeserve.models.version import ModelVersion

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
ALIASES = "aliases.json"
LOCK = ".lock"


class RegistryError(ValueError):
    """A bad name, alias or registry state; the message says what is allowed."""


class NotFoundError(LookupError):
    """An unknown model, version or alias."""


def is_number(text: str) -> bool:
    """ASCII digits only. ``str.isdigit`` alone also passes '²', which ``int`` refuses, and '١', which it reads as 1."""
    return text.isascii() and text.isdigit()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise RegistryError(f"invalid model name {name!r}: use 1-100 letters, digits, '_', '.', '-', starting with a letter or digit, without '..'")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias) or ".." in alias:
        raise RegistryError(f"invalid alias {alias!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or '_'")
    return alias


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write a file and sync it to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def exclusive_lock(path: Path, blocking: bool = True, on_acquired: Callable[[int], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` while the block runs; without ``blocking``, filelock.Timeout at once
    when another holds it. ``on_acquired(fd)`` may write into the file, for whoever finds it held.

    filelock's flock: the kernel lets go when the process ends, however it ends. The file is removed on the way out, so
    nothing is left behind; that is safe because a waiter whose lock lands on the removed file sees it unlinked and
    starts again on the file the path names then (filelock checks), and a file another holder made since is left alone.
    No soft fallback: on a filesystem without flock it fails rather than leave a lock a killed process cannot release.
    """
    held: list[os.stat_result] = []

    def acquired(fd: int) -> None:
        held.append(os.fstat(fd))
        if on_acquired is not None:
            on_acquired(fd)

    lock = FileLock(path, blocking=blocking, fallback_to_soft=False, on_acquired=acquired)
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
            break
        except FileNotFoundError:  # the folder was removed in between, by a holder that finished
            continue
    try:
        yield
    finally:
        try:
            if os.path.samestat(os.stat(path), held[-1]):
                path.unlink()  # before unlocking: a waiter then finds the path gone or new, never shared
        except FileNotFoundError:
            pass
        finally:
            lock.release()


class Registry:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    # --- reading ---------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; [] when there are none."""
        folder = self._model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if is_number(p.name) and not p.name.startswith("0") and (p / MANIFEST).is_file())

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version, with ``latest`` always the highest published version."""
        path = self._model_dir(name) / ALIASES
        return valid_aliases(path.read_bytes() if path.is_file() else None, self.versions(name))

    def resolve(self, name: str, ref: str | int = "latest") -> int:
        """A version number or alias -> an existing version number. Raises NotFoundError."""
        return resolve(self, name, ref)

    def version_dir(self, name: str, version: int) -> Path:
        folder = self._model_dir(name) / str(int(version))
        # A version folder must really live inside the registry (no symlink leading out of it).
        root = self.root.resolve()
        if root not in folder.resolve().parents:
            raise RegistryError(f"{folder} resolves outside the registry {root}; refusing to read it")
        return folder

    def manifest(self, name: str, ref: str | int = "latest") -> dict[str, Any]:
        return json.loads((self.version_dir(name, self.resolve(name, ref)) / MANIFEST).read_text())

    def load(self, name: str, ref: str | int = "latest", device: str | torch.device = "cpu") -> ModelVersion:
        from aeserve.models.checkpoint import load_version  # torch: a slim server never calls this

        number = self.resolve(name, ref)
        version = load_version(self.version_dir(name, number), device)
        if version.manifest.get("version") != number:  # a folder copied by hand would answer as another version
            raise CheckpointError(f"{self.version_dir(name, number) / MANIFEST}: the manifest is of version "
                                  f"{version.manifest.get('version')!r}, but it sits in {name}/{number}; a version keeps the number it was published as")
        return version

    # --- writing ---------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold ``<name>/.lock`` exclusively (``exclusive_lock``: no run leaves it behind); the name's folder."""
        folder = self._model_dir(name)
        with exclusive_lock(folder / LOCK):
            yield folder

    def _write_aliases(self, folder: Path, aliases: dict[str, int]) -> None:
        data = aliases_json(aliases)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aliases-")
        os.close(fd)
        os.chmod(tmp, folder.stat().st_mode & 0o666)  # mkstemp makes it 0600: readable as the model's folder is
        write_synced(Path(tmp), data)
        os.replace(tmp, folder / ALIASES)
        fsync_dir(folder)

    def publish(self, name: str, manifest: dict[str, Any], weights: bytes, extra_files: dict[str, bytes] | None = None) -> int:
        """Publish a new version atomically; fills in name, version, sha256 and created_at. Returns the version.

        ``extra_files`` are more files for the version folder (relative path -> bytes), made before publishing and
        written inside the same atomic step: under the lock nothing runs but writing.
        """
        with self._locked(name) as folder:
            version = (self.versions(name) or [0])[-1] + 1
            self._install(folder, version, version_files(finished_manifest(name, version, manifest, weights, extra_files), weights, extra_files))
            self._write_aliases(folder, self.aliases(name))
        return version

    def install(self, name: str, version: int, files: dict[str, bytes], replace: bool = False) -> bool:
        """Put a version made elsewhere (a copy of one in object storage) in place whole; False when it is already here.

        With ``replace``, one already here is replaced (its source now holds other contents under that number): the
        new one is written whole before the old one moves out of its way.
        """
        with self._locked(name) as folder:
            here = version in self.versions(name)
            if here and not replace:
                return False
            self._install(folder, version, files, replace=here)
            return True

    def remove(self, name: str, version: int) -> bool:
        """Take a version out whole (a copy's, whose source no longer holds it); False when it is not here."""
        with self._locked(name) as folder:
            if version not in self.versions(name):
                return False
            _discard(folder, version)
            fsync_dir(folder)
            return True

    def write_aliases(self, name: str, aliases: dict[str, int]) -> None:
        """Replace ``name``'s aliases file (a copy's, following its source); ``latest`` is set from the versions here."""
        with self._locked(name) as folder:
            self._write_aliases(folder, {**aliases, **{k: v for k, v in self.aliases(name).items() if k == "latest"}})

    @staticmethod
    def _install(folder: Path, version: int, files: dict[str, bytes], replace: bool = False) -> None:
        """Write ``files`` into a temporary folder, sync, and rename it to ``<folder>/<version>``: all or nothing.
        ``replace``: a version there already moves out of the way just before the rename."""
        for stale in folder.glob(".tmp-*"):  # left by a writer killed mid-write: under the lock, nobody else is writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-{version}-"))
        try:
            # mkdtemp makes it 0700; a server running as another user (the container's) must read what was published
            os.chmod(tmp, folder.stat().st_mode & 0o777)
            for relative, data in files.items():
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                write_synced(tmp / relative, data)
            fsync_dir(tmp)
            if replace:
                _discard(folder, version)
            os.rename(tmp, folder / str(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(folder)

    def set_alias(self, name: str, version: int | str, alias: str) -> None:
        check_alias_update(alias, version)
        self.resolve(name, str(version))  # an unknown model or version is refused before its folder is made
        with self._locked(name) as folder:
            aliases = self.aliases(name)
            aliases[alias] = self.resolve(name, str(version))
            self._write_aliases(folder, aliases)


def _discard(folder: Path, version: int) -> None:
    """Remove ``<folder>/<version>``: renamed out of sight first, so a reader sees the version whole or not at all."""
    trash = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-{version}-removed-"))
    os.rename(folder / str(version), trash / str(version))
    shutil.rmtree(trash, ignore_errors=True)


def valid_aliases(stored: bytes | None, versions: list[int]) -> dict[str, int]:
    """The aliases in an ``aliases.json`` body that name published versions, plus ``latest`` at the highest one.

    An unreadable body counts as no aliases rather than hiding the versions.
    """
    try:
        parsed = json.loads(stored) if stored else {}
    except (ValueError, RecursionError):  # not JSON or not UTF-8, nested too deep, a number of thousands of digits
        parsed = {}
    aliases = {}
    for alias, value in parsed.items() if isinstance(parsed, dict) else []:
        text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
        if isinstance(alias, str) and ALIAS_PATTERN.match(alias) and is_number(text) and len(text) <= 18 and int(text) in versions:
            aliases[alias] = int(text)
    if versions:
        aliases["latest"] = versions[-1]
    return dict(sorted(aliases.items()))


def aliases_json(aliases: dict[str, int]) -> bytes:
    return (json.dumps({k: str(v) for k, v in sorted(aliases.items())}, indent=2) + "\n").encode()


def resolve(registry: Any, name: str, ref: str | int = "latest") -> int:
    """A version number or alias of ``name`` in ``registry`` -> an existing version number. Raises NotFoundError."""
    versions = registry.versions(name)
    if not versions:
        raise NotFoundError(f"unknown model {name!r}; available: {registry.names()}")
    ref = str(ref)
    if is_number(ref) and int(ref) in versions:
        return int(ref)
    aliases = registry.aliases(name)
    if not is_number(ref) and ref in aliases:
        return aliases[ref]
    raise NotFoundError(f"model {name!r} has no version or alias {ref!r}; versions: {versions}, aliases: {sorted(aliases)}")


def check_alias_update(alias: str, version: int | str) -> None:
    check_alias(alias)
    if alias == "latest":
        raise RegistryError("'latest' is kept at the highest version and cannot be set by hand")
    if not is_number(str(version)):
        raise RegistryError(f"version must be a number, got {version!r}")


def finished_manifest(name: str, version: int, manifest: dict[str, Any], weights: bytes,
                      extra_files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """The manifest as published: name and version first, then the trainer's keys, the weights' sha256, the other
    files' sha256 (``files``, verified on load like the weights) and the time."""
    return {
        "name": name,
        "version": version,
        **{k: v for k, v in manifest.items() if k not in ("name", "version", "files")},
        "sha256": sha256_bytes(weights),
        **({"files": listing(extra_files)} if extra_files else {}),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def version_files(manifest: dict[str, Any], weights: bytes, extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A version's files by relative path, in writing order: the weights, the extra files, the manifest last."""
    files = {WEIGHTS: weights}
    for relative, data in (extra_files or {}).items():
        path = PurePosixPath(relative)
        if path.is_absolute() or ".." in path.parts or not path.parts or path.name in (MANIFEST, WEIGHTS):
            raise RegistryError(f"extra file {relative!r} must stay inside the version folder and not replace its manifest or weights")
        files[str(path)] = data
    files[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    return files


def open_registry(location: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None) -> Any:
    """The registry at ``location`` (``registry_location``: ``--registry``, else ``$AESERVE_REGISTRY``, else ``./registry``).

    A plain path or ``file://`` URL is a local folder (``Registry``); any other URL (``s3://``, ``gs://``, …) is
    object storage through fsspec (``ObjectRegistry``), copied into ``cache`` for loading.
    """
    where = registry_location(location)
    if not is_url(where):
        return Registry(local_path(where))
    from aeserve.models.remote import ObjectRegistry

    try:
        return ObjectRegistry(where, cache)
    except (ImportError, ValueError) as e:  # fsspec knows the scheme but its package is not installed, or does not know it
        raise RegistryError(f"cannot open the registry {where}: {e}{install_hint(where)}") from None
