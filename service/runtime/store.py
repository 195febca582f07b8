"""Loaded model versions: loaded and warmed at start, refreshed from the registry while serving.

Requests look versions up in an in-memory index that is swapped whole on
refresh, so a request keeps the ModelVersion it started with. A version that
fails to load is reported and never replaces a good one. Served from a
registry URL, the store there decides: a version its local copy no longer
holds stops being served, and one replaced there is loaded again.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aeserve.models.files import MANIFEST, CheckpointError
from aeserve.models.registry import NotFoundError, Registry, RegistryError, check_name, is_number
from aeserve.models.served import NoGraphs, load_served, torch_installed
from aeserve.service.errors import NeedsFullInstall, NotReady

if TYPE_CHECKING:
    from aeserve.models.mirror import Changes, Mirror
    from aeserve.models.version import ModelVersion
    from aeserve.service.runtime.engines import Engines

log = logging.getLogger("aeserve.store")


@dataclass(frozen=True)
class ModelEntry:
    versions: dict[int, ModelVersion]
    aliases: dict[str, int]


@dataclass
class ModelStore:
    registry: Registry
    device: str = "cpu"
    engines: Engines | None = None  # given new versions' graphs for ONNX Runtime, when it runs small batches
    only: list[str] = field(default_factory=list)
    source: Mirror | None = None  # with a registry URL: ``registry`` is its local copy, brought up to date before each refresh
    source_reachable: bool | None = None  # None: no remote source (or not asked yet)
    source_errors: int = 0  # failed attempts to reach it
    source_synced_at: float = 0.0  # time.time() of the last complete sync
    source_removed: int = 0  # versions taken out of the local copy: the store no longer holds them as copied
    source_replaced: int = 0  # versions replaced in the local copy: the store holds other contents under their number
    _unapplied: Changes | None = None  # what syncs changed in the local copy that the index does not show yet
    _index: dict[str, ModelEntry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> why it was refused
    needs_torch: dict[str, dict[int, str]] = field(default_factory=dict)  # name -> {version: why}, without torch: no graphs stored
    loaded_once: bool = False
    generation: int = 0  # counts the index's swaps
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        return sorted(self._index)

    def entry(self, name: str) -> ModelEntry:
        index = self._index
        if not self.loaded_once:
            raise NotReady("models are still loading; retry shortly", retry_after=1)
        if name not in index:
            self._refuse_unservable(name, "latest")
            raise NotFoundError(f"unknown model {name!r}; available: {sorted(index)}")
        return index[name]

    def get(self, name: str, ref: str = "latest") -> ModelVersion:
        """A loaded version by number or alias. Raises NotFoundError naming what exists, NeedsFullInstall for a version
        this server cannot run."""
        entry = self.entry(name)
        version = int(ref) if is_number(ref) else entry.aliases.get(ref)
        if version not in entry.versions:
            self._refuse_unservable(name, ref)
            raise NotFoundError(
                f"model {name!r} has no loaded version or alias {ref!r}; versions: {sorted(entry.versions)}, aliases: {sorted(entry.aliases)}")
        return entry.versions[version]

    def _refuse_unservable(self, name: str, ref: str) -> None:
        """NeedsFullInstall when ``ref`` names a version of ``name`` that loaded without its graphs and without torch."""
        unservable = self.needs_torch.get(name)
        if not unservable:
            return
        number: int | None = None
        if is_number(ref):
            number = int(ref)
        elif ref == "latest":
            number = max(unservable)
        else:
            with contextlib.suppress(OSError, RegistryError, ValueError):
                number = self.registry.aliases(name).get(ref)
        if number in unservable:
            raise NeedsFullInstall(unservable[number])

    def refresh(self) -> list[str]:
        """Load versions published since the last refresh; returns 'name:version' of those added.

        New versions serve on torch as soon as they are loaded and warmed; with
        ONNX Runtime for small batches, they move to it when their export
        (started before loading, in a child process) is done and checked, a few
        seconds later. A call picks its engine when it starts, so either way it
        finishes on the path it began on.
        """
        with self._lock, _loading_threads():
            self._sync()
            kept = self._kept()
            names = [n for n in self.registry.names() if not self.only or n in self.only]
            new = {name: [v for v in self.registry.versions(name)  # published versions never change: load each once
                          if v not in kept.get(name, {}) and f"{name}:{v}" not in self.failed]
                   for name in names}
            export = self.engines.export(self._folders(new)) if self.engines is not None else None
            try:
                loaded = self._load(new)
                self._index = self._indexed(names, kept, loaded)
                self.generation += 1
                self._unapplied = None
            except BaseException:  # an unreadable aliases file, say: the export child must not outlive the refresh
                if export is not None:
                    export.close()
                raise
            self.loaded_once = True
            if self.engines is not None:  # stored graphs go to the small engine now, exported ones when the export is done
                self.engines.adopt(export, [v for versions in loaded.values() for v in versions.values()])
            return [f"{name}:{v}" for name, versions in loaded.items() for v in versions]

    def _sync(self) -> None:
        """Bring the local copy in line with the registry URL; when the store cannot be reached, log it once and keep
        serving what is copied (clients see no change). What the sync changed in the copy goes to ``_unapplied``."""
        if self.source is None:
            return
        from aeserve.models.mirror import Changes

        # Filled as the sync goes, so a sync cut short still tells what it changed; kept until the index shows it.
        changes = self._unapplied = self._unapplied or Changes()
        removed, replaced, copied = len(changes.removed), len(changes.replaced), len(changes.copied)
        try:
            self.source.sync(self.only or None, changes)
        except Exception as e:  # noqa: BLE001 - any failure of the store (network, credentials, throttling) is an outage here
            self.source_errors += 1
            if self.source_reachable is not False:
                log.warning("registry %s unreachable, serving its local copy in %s: %s: %s",
                            self.source.source.location, self.registry.root, type(e).__name__, e)
            self.source_reachable = False
        else:
            if self.source_reachable is False:
                log.warning("registry %s reachable again", self.source.source.location)
            self.source_reachable, self.source_synced_at = True, time.time()
        finally:
            self.source_removed += len(changes.removed) - removed
            self.source_replaced += len(changes.replaced) - replaced
        for key in changes.copied[copied:]:
            log.info("copied %s from %s", key, self.source.source.location)

    def _kept(self) -> dict[str, dict[int, ModelVersion]]:
        """The versions served so far that still serve: all but those a sync took out of the copy or replaced there."""
        kept = {name: dict(entry.versions) for name, entry in self._index.items()}
        changes = self._unapplied
        if changes is None:
            return kept
        for key in [*changes.removed, *changes.replaced]:
            name, _, number = key.partition(":")
            self.failed.pop(key, None)  # a replaced version gets a new chance to load; a removed one may come back
            if kept.get(name, {}).pop(int(number), None) is None:
                continue
            if key in changes.removed:
                log.warning("no longer serving %s: the registry %s no longer holds the version copied from it", key, self.source.source.location)
            else:
                log.warning("loading %s again: the registry %s holds other contents under its number", key, self.source.source.location)
        return kept

    def _indexed(self, names: list[str], kept: dict[str, dict[int, ModelVersion]],
                 loaded: dict[str, dict[int, ModelVersion]]) -> dict[str, ModelEntry]:
        """The index after a refresh: the versions kept from before plus those just loaded, and their aliases."""
        index: dict[str, ModelEntry] = {}
        for name in names:
            versions = {**kept.get(name, {}), **loaded.get(name, {})}
            if not versions:
                continue
            aliases = {a: v for a, v in self.registry.aliases(name).items() if v in versions}
            aliases["latest"] = max(versions)  # the highest version that loaded
            index[name] = ModelEntry(versions, aliases)
        return index

    def _folders(self, new: dict[str, list[int]]) -> list:
        folders = []
        for name, numbers in new.items():
            for number in numbers:
                with contextlib.suppress(RegistryError):  # loading it fails too, and says why
                    folders.append(self.registry.version_dir(name, number))
        return folders

    def _load(self, new: dict[str, list[int]]) -> dict[str, dict[int, ModelVersion]]:
        loaded: dict[str, dict[int, ModelVersion]] = {}
        for name, numbers in new.items():
            for number in numbers:
                key = f"{name}:{number}"
                try:
                    loaded.setdefault(name, {})[number] = warmed(self._load_version(name, number))
                    log.info("loaded %s", key)
                except NoGraphs as e:
                    self.failed[key] = str(e)
                    self.needs_torch.setdefault(name, {})[number] = f"{key} cannot be served here: {e}"
                    log.error("refused %s: %s", key, e)
                except (CheckpointError, RegistryError, NotFoundError, OSError, ValueError, KeyError, TypeError) as e:
                    self.failed[key] = str(e)
                    log.error("refused %s: %s", key, e)
        return loaded

    def _load_version(self, name: str, number: int) -> ModelVersion:
        """One version: on torch where it is installed, else from its stored graphs (a ``ServedVersion``)."""
        if torch_installed():
            return self.registry.load(name, number, self.device)
        folder = self.registry.version_dir(name, number)
        version = load_served(folder)
        if version.manifest.get("version") != number:  # a folder copied by hand would answer as another version
            raise CheckpointError(f"{folder / MANIFEST}: the manifest is of version {version.manifest.get('version')!r}, but it sits in "
                                  f"{name}/{number}; a version keeps the number it was published as")
        return version

    def loaded(self) -> list[tuple[str, int]]:
        return [(name, v) for name, entry in sorted(self._index.items()) for v in sorted(entry.versions)]


def warmed(version: ModelVersion) -> ModelVersion:
    """Run every graph once so the first request pays no one-off costs."""
    version.warm()
    return version


def _loading_threads() -> contextlib.AbstractContextManager:
    """Torch runs loading and warm-up on one thread (torch_engine.one_torch_thread); without torch there is nothing to set."""
    if not torch_installed():
        return contextlib.nullcontext()
    from aeserve.service.runtime.torch_engine import one_torch_thread

    return one_torch_thread()


def valid_name(name: str) -> bool:
    try:
        check_name(name)
        return True
    except RegistryError:
        return False
