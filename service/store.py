"""Loaded model versions: loaded and warmed at start, refreshed from the registry while serving.

Requests look versions up in an in-memory index that is swapped whole on
refresh, so a request keeps the ModelVersion it started with. A version that
fails to load is reported and never replaces a good one.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from aeserve.models.checkpoint import CheckpointError, ModelVersion
from aeserve.models.onnx_engine import EngineExport
from aeserve.models.registry import NotFoundError, Registry, RegistryError, check_name

log = logging.getLogger("aeserve.store")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch work off the model threads (loading, warm-up, the engine's checks) runs on its calling thread alone.

    OpenMP (libgomp) keeps a team of worker threads for every thread that ever
    ran torch on several threads. Once a process holds more of them than it has
    cores, every team stops spin-waiting between parallel regions and sleeps
    instead, and a big model call then waits on each wake-up. On 2 cores a
    loading thread's team (with ``OMP_WAIT_POLICY=PASSIVE``, as ``aeserve
    serve`` set before) left the model thread's 10,000-row encode 9-30 ms
    slower than the same call in a client process; with loading on one thread
    and spin-waiting allowed, from 15 ms faster to 2 ms slower. Two servers side
    by side, 40 alternating 10,000-row posts, twice: 24-25 ms less per post
    (benchmarks/SERVING.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class NotReadyError(RuntimeError):
    """Models are still loading."""


@dataclass(frozen=True)
class ModelEntry:
    versions: dict[int, ModelVersion]
    aliases: dict[str, int]


@dataclass
class ModelStore:
    registry: Registry
    device: str = "cpu"
    engine: Literal["onnx", "torch"] = "torch"  # "onnx": small CPU batches on ONNX Runtime (models/onnx_engine.py), as the service asks by default
    only: list[str] = field(default_factory=list)
    # Called (on the refresh thread) for each version that got its ONNX engine, with the graphs' ONNX bytes.
    on_engine: Callable[[ModelVersion, dict[str, bytes]], None] | None = None
    _index: dict[str, ModelEntry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> why it was refused
    loaded_once: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        return sorted(self._index)

    def entry(self, name: str) -> ModelEntry:
        index = self._index
        if not self.loaded_once:
            raise NotReadyError("models are still loading; retry shortly")
        if name not in index:
            raise NotFoundError(f"unknown model {name!r}; available: {sorted(index)}")
        return index[name]

    def get(self, name: str, ref: str = "latest") -> ModelVersion:
        """A loaded version by number or alias. Raises NotFoundError naming what exists."""
        entry = self.entry(name)
        version = int(ref) if ref.isdigit() else entry.aliases.get(ref)
        if version not in entry.versions:
            raise NotFoundError(
                f"model {name!r} has no loaded version or alias {ref!r}; versions: {sorted(entry.versions)}, aliases: {sorted(entry.aliases)}")
        return entry.versions[version]

    def refresh(self) -> list[str]:
        """Load versions published since the last refresh; returns 'name:version' of those added.

        New versions serve on torch as soon as they are loaded and warmed; with
        the ONNX engine on, their small batches move to it when its export
        (started before loading, in a child process) is done and checked, a few
        seconds later. A call checks for the engine when it starts, so either
        way it finishes on the path it began on.
        """
        with self._lock, one_torch_thread():
            names = [n for n in self.registry.names() if not self.only or n in self.only]
            new = {name: [v for v in self.registry.versions(name)  # published versions never change: load each once
                          if v not in self._index.get(name, ModelEntry({}, {})).versions and f"{name}:{v}" not in self.failed]
                   for name in names}
            export = None
            if self.engine == "onnx" and self.device == "cpu" and any(new.values()):
                try:
                    export = EngineExport(self._folders(new))
                except OSError as e:  # no child process: torch serves everything
                    log.warning("small batches stay on torch: cannot start the ONNX export: %s", e)
            try:
                loaded = self._load(new)
                self._index = self._indexed(names, loaded)
            except BaseException:  # an unreadable aliases file, say: the export child must not outlive the refresh
                if export is not None:
                    export.close()
                raise
            self.loaded_once = True
            if export is not None:
                export.attach([v for versions in loaded.values() for v in versions.values()], on_engine=self.on_engine)
            return [f"{name}:{v}" for name, versions in loaded.items() for v in versions]

    def export_again(self, versions: list[ModelVersion]) -> None:
        """Export loaded ``versions`` again and hand each checked engine to ``on_engine`` (a new engine process)."""
        with one_torch_thread():  # the engine's check runs torch
            EngineExport([v.folder for v in versions]).attach(versions, on_engine=self.on_engine)

    def _indexed(self, names: list[str], loaded: dict[str, dict[int, ModelVersion]]) -> dict[str, ModelEntry]:
        """The index after a refresh: the versions already served plus those just loaded, and their aliases."""
        index: dict[str, ModelEntry] = {}
        for name in names:
            versions = {**self._index.get(name, ModelEntry({}, {})).versions, **loaded.get(name, {})}
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
                    loaded.setdefault(name, {})[number] = warmed(self.registry.load(name, number, self.device))
                    log.info("loaded %s", key)
                except (CheckpointError, RegistryError, NotFoundError, OSError, ValueError, KeyError, TypeError) as e:
                    self.failed[key] = str(e)
                    log.error("refused %s: %s", key, e)
        return loaded

    def loaded(self) -> list[tuple[str, int]]:
        return [(name, v) for name, entry in sorted(self._index.items()) for v in sorted(entry.versions)]

    def on_onnx(self) -> int:
        """How many loaded versions run their small batches on ONNX Runtime."""
        return sum(v.engine is not None for entry in self._index.values() for v in entry.versions.values())


def warmed(version: ModelVersion) -> ModelVersion:
    """Run every operation once so the first request pays no one-off costs (an engine's sessions are run by its check)."""
    x = np.zeros((1, *version.input_shape), np.float32)
    version.reconstruct(x)
    version.project(x)
    version.decode(version.encode(x))
    return version


def valid_name(name: str) -> bool:
    try:
        check_name(name)
        return True
    except RegistryError:
        return False
