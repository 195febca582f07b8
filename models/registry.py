"""The on-disk registry: ``<root>/<name>/<version>/{manifest.json,weights.safetensors}``.

Versions are positive integers and never change once published; a version is
written to a temporary folder, synced, then renamed into place, so a reader
never sees half of one. ``<root>/<name>/aliases.json`` maps alias -> version,
with ``latest`` kept at the highest version.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from aeserve.models.checkpoint import MANIFEST, WEIGHTS, ModelVersion, load_version, sha256_bytes

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
ALIASES = "aliases.json"
LOCK = ".lock"


class RegistryError(ValueError):
    """A bad name, alias or registry state; the message says what is allowed."""


class NotFoundError(LookupError):
    """An unknown model, version or alias."""


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


class Registry:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    @staticmethod
    def default_root(explicit: str | None = None) -> Path:
        """``--registry``, else ``$AESERVE_REGISTRY``, else ``./registry``."""
        return Path(explicit or os.environ.get("AESERVE_REGISTRY") or "registry")

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
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and not p.name.startswith("0") and (p / MANIFEST).is_file())

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version, with ``latest`` always the highest published version."""
        versions = self.versions(name)
        path = self._model_dir(name) / ALIASES
        stored: dict[str, Any] = {}
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                stored = {}
        aliases = {
            alias: int(v)
            for alias, v in (stored.items() if isinstance(stored, dict) else [])
            if isinstance(alias, str) and ALIAS_PATTERN.match(alias) and str(v).isdigit() and int(v) in versions
        }
        if versions:
            aliases["latest"] = versions[-1]
        return dict(sorted(aliases.items()))

    def resolve(self, name: str, ref: str | int = "latest") -> int:
        """A version number or alias -> an existing version number. Raises NotFoundError."""
        versions = self.versions(name)
        if not versions:
            raise NotFoundError(f"unknown model {name!r}; available: {self.names()}")
        ref = str(ref)
        if ref.isdigit():
            if int(ref) in versions:
                return int(ref)
        else:
            aliases = self.aliases(name)
            if ref in aliases:
                return aliases[ref]
        raise NotFoundError(f"model {name!r} has no version or alias {ref!r}; versions: {versions}, aliases: {sorted(self.aliases(name))}")

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
        return load_version(self.version_dir(name, self.resolve(name, ref)), device)

    # --- writing ---------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold ``<name>/.lock`` exclusively; the file is removed on the way out, so no run leaves a lock behind.

        Removing it is safe because a waiter that got the lock on a file since removed (or replaced) sees that
        the path no longer names the file it holds, and starts again on the current one.
        """
        folder = self._model_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK
        while True:
            lock = open(path, "a+")
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                held, current = os.fstat(lock.fileno()), os.stat(path)
                if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                    break
            except FileNotFoundError:
                pass
            lock.close()
        try:
            yield folder
        finally:
            path.unlink(missing_ok=True)  # before unlocking: a waiter then finds the path gone or new, never shared
            lock.close()

    def _write_aliases(self, folder: Path, aliases: dict[str, int]) -> None:
        data = (json.dumps({k: str(v) for k, v in sorted(aliases.items())}, indent=2) + "\n").encode()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".aliases-")
        os.close(fd)
        write_synced(Path(tmp), data)
        os.replace(tmp, folder / ALIASES)
        fsync_dir(folder)

    def publish(self, name: str, manifest: dict[str, Any], weights: bytes,
                extra_files: Callable[[dict[str, Any]], dict[str, bytes]] | None = None) -> int:
        """Publish a new version atomically; fills in name, version, sha256 and created_at. Returns the version.

        ``extra_files`` gets the final manifest and returns more files for the
        version folder (relative path -> bytes), written inside the same atomic step.
        """
        with self._locked(name) as folder:
            for stale in folder.glob(".tmp-*"):  # left by a publisher killed mid-write: under the lock, nobody else is writing
                shutil.rmtree(stale, ignore_errors=True)
            version = (self.versions(name) or [0])[-1] + 1
            manifest = {
                "name": name,
                "version": version,
                **{k: v for k, v in manifest.items() if k not in ("name", "version")},
                "sha256": sha256_bytes(weights),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-{version}-"))
            try:
                write_synced(tmp / WEIGHTS, weights)
                for relative, data in (extra_files(manifest) if extra_files else {}).items():
                    target = (tmp / relative).resolve()
                    if tmp.resolve() not in target.parents or Path(relative).name in (MANIFEST, WEIGHTS):
                        raise RegistryError(f"extra file {relative!r} must stay inside the version folder and not replace its manifest or weights")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_synced(target, data)
                write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
                fsync_dir(tmp)
                os.rename(tmp, folder / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(folder)
            aliases = self.aliases(name)
            self._write_aliases(folder, aliases)
        return version

    def set_alias(self, name: str, version: int | str, alias: str) -> None:
        check_alias(alias)
        if alias == "latest":
            raise RegistryError("'latest' is kept at the highest version and cannot be set by hand")
        with self._locked(name) as folder:
            resolved = self.resolve(name, str(version))
            if not str(version).isdigit():
                raise RegistryError(f"version must be a number, got {version!r}")
            aliases = self.aliases(name)
            aliases[alias] = resolved
            self._write_aliases(folder, aliases)


def open_registry(location: str | os.PathLike[str] | None = None) -> Registry:
    """The registry at ``location`` (``--registry``), else ``$AESERVE_REGISTRY``, else ``./registry``."""
    return Registry(Registry.default_root(None if location is None else str(location)))
