"""The engines behind one interface: where each model call runs, decided here and nowhere else.

A deployment chooses its engine (``Settings.engine``, ``Settings.device``):

- ``torch``: every call on torch (``torch_engine.py``), on the CPU or a GPU, on model threads (plain threads fed by
  a queue, so the event loop never blocks).
- ``onnx`` (the default on the CPU): calls under ``SMALL_BATCH_ROWS`` rows run on ONNX Runtime, bigger ones on
  torch with every core. In the server torch lets go of the GIL at each operator and waits for the busy event loop
  to hand it back; an ONNX Runtime session runs a whole graph in one call, and does better on few rows, torch on
  every core on many (where they cross: docs/serving.md, "Costs the code is shaped by"). The small batches run in
  the engine process (``engine_process.py``), which the event loop feeds directly and which shares no GIL with it,
  or with ``engine_process`` off on the server's model threads (``OnnxThreads``).

Graphs for ONNX Runtime come stored with a version (models/served.py), or for one published without them are
exported and checked in a child process (``export.py``) when it loads; until then, and for a version whose graphs do
not export or match torch, torch serves every call.

Without torch (the slim install) every version is a ``ServedVersion``: small calls run as above, and the others on
its own ONNX Runtime sessions with every core, on the model threads, in blocks.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from aeserve.models.outputs import Call
from aeserve.models.served import FULL_INSTALL, lists_graphs, torch_installed
from aeserve.service.errors import NeedsFullInstall
from aeserve.service.runtime.engine_process import EngineProcess
from aeserve.service.runtime.export import GraphExport

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

log = logging.getLogger("aeserve.engines")
Outputs = tuple[np.ndarray, ...]

SMALL_BATCH_ROWS = 128  # calls of fewer rows go to ONNX Runtime where a version has its graphs
RESTART_S = (5.0, 600.0)  # the first wait before a dead engine process is replaced, and the longest
BLOCK_ROWS = 1024  # big calls on a version's own ONNX Runtime sessions run in blocks of this many rows, as on torch


def run_served(version: Any, call: Call, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """A big call of a ``ServedVersion`` on its sessions with every core, in blocks that bound its memory."""
    if len(rows) <= BLOCK_ROWS:
        return version.run(call, rows)
    parts = [version.run(call, rows[start:start + BLOCK_ROWS]) for start in range(0, len(rows), BLOCK_ROWS)]
    return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))


class ModelThreads:
    """``threads`` threads that run model calls from one queue; ``run`` answers with an asyncio future.

    A ``ThreadPoolExecutor`` does the same with more Python around each call (a ``concurrent.futures.Future`` with its
    lock and condition, then a chained asyncio future), which the model thread runs holding the GIL the event loop wants.
    """

    def __init__(self, threads: int) -> None:
        self._calls: SimpleQueue = SimpleQueue()
        self._count = threads
        self._threads: list[threading.Thread] = []  # started by the first call: an app that never serves starts none

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """``fn(*args)`` on a model thread; the future (of the running loop) gets its result or exception."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._serve, name=f"aeserve-model_{i}", daemon=True) for i in range(self._count)]
            for thread in self._threads:
                thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, loop, future))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, loop, future = call
            try:
                outcome = (fn(*args), None)
            except BaseException as e:  # whatever a call raises, the thread lives on to serve the next
                outcome = (None, e if isinstance(e, Exception) else RuntimeError(f"the model call was interrupted: {e!r}"))
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop has closed; nobody waits for this answer
                pass

    def close(self) -> None:
        """Drop the calls not yet started and stop the threads once their current call returns."""
        try:
            while True:
                self._calls.get_nowait()
        except Empty:
            pass
        for _ in self._threads:
            self._calls.put(None)


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():  # cancelled while the call ran
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class SmallEngine(Protocol):
    """Runs small calls of the versions it has taken, answering on the event loop."""

    def take(self, version: ModelVersion, graphs: dict[str, bytes]) -> None: ...  # from the refresh thread
    def serves(self, version: ModelVersion, call: Call) -> bool: ...
    def run(self, version: ModelVersion, call: Call, rows: np.ndarray) -> asyncio.Future: ...
    def versions(self) -> int: ...


class TakenVersion(NamedTuple):
    """A version on ONNX Runtime in the server: held, so that its id() is not reused; the OnnxVersion that runs it."""

    version: ModelVersion
    onnx: Any


class OnnxThreads:
    """ONNX Runtime in the server process, on the model threads."""

    def __init__(self, threads: ModelThreads) -> None:
        self._threads = threads
        self._versions: dict[int, TakenVersion] = {}  # by id(version)

    def take(self, version: ModelVersion, graphs: dict[str, bytes]) -> None:
        from aeserve.service.runtime.onnx import OnnxVersion

        try:
            engine = OnnxVersion(graphs, version.preprocessing, version.anomaly)
            engine.warm()
        except Exception as e:  # onnxruntime's own error types
            log.warning("small batches of %s:%s stay on torch: %s: %s", version.name, version.version, type(e).__name__, e)
            return
        self._versions[id(version)] = TakenVersion(version, engine)
        log.info("small batches of %s:%s run on ONNX Runtime in the server", version.name, version.version)

    def serves(self, version: ModelVersion, call: Call) -> bool:
        taken = self._versions.get(id(version))
        return taken is not None and taken.onnx.serves(call)

    def run(self, version: ModelVersion, call: Call, rows: np.ndarray) -> asyncio.Future:
        return self._threads.run(self._versions[id(version)].onnx.run, call, rows)

    def versions(self) -> int:
        return len(self._versions)


class Engines:
    """Runs model calls: small ones on the small engine when it serves them, the rest on torch on model threads."""

    def __init__(self, device: str, engine: str = "onnx", engine_process: bool = True, threads: int = 1) -> None:
        self.device = device
        self.threads = ModelThreads(threads)
        self.torch = None
        if torch_installed():
            from aeserve.service.runtime.torch_engine import TorchEngine

            self.torch = TorchEngine()
        elif engine == "torch" or device != "cpu":
            raise ValueError(f"--engine {engine} --device {device} needs torch, which is not installed here (a slim install serves "
                             "with --engine onnx on the CPU); install aeserve with torch for it")
        self.big = self.torch.run if self.torch is not None else run_served
        self.process = EngineProcess() if engine == "onnx" and device == "cpu" and engine_process else None
        self.small: SmallEngine | None = self.process
        if engine == "onnx" and device == "cpu" and not engine_process:
            self.small = OnnxThreads(self.threads)
        self._keeper: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the engine process (it imports ONNX Runtime while the server loads its models), and keep it alive."""
        if self.process is None:
            return
        try:
            await self.process.start()
        except OSError as e:
            log.warning("small batches stay on torch: cannot start the engine process: %s", e)
            self.small = self.process = None
            return
        self._keeper = asyncio.create_task(self._keep_process(self.process))

    def export(self, folders: list) -> GraphExport | None:
        """Start exporting the graphs of new version folders that have none stored (before they load, so the child works
        meanwhile). Without torch there is no exporter: such versions are refused when they load."""
        folders = [folder for folder in folders if not lists_graphs(folder)]
        if self.small is None or not folders or self.torch is None:
            return None
        try:
            return GraphExport(folders)
        except OSError as e:  # no child process: torch serves everything
            log.warning("small batches stay on torch: cannot start the ONNX export: %s", e)
            return None

    def adopt(self, export: GraphExport | None, versions: list[ModelVersion]) -> None:
        """Hand the stored or exported graphs of loaded ``versions`` to the small engine (on the refresh thread)."""
        if self.small is None:
            return
        for version in versions:
            if version.graphs:
                self.small.take(version, version.graphs)
        if export is not None:
            export.collect([v for v in versions if not v.graphs], self.small.take)

    async def run(self, version: ModelVersion, call: Call, rows: np.ndarray) -> Outputs:
        """``call`` on ``rows``: the one place that decides where a call runs."""
        small = self.small
        if small is not None and len(rows) < SMALL_BATCH_ROWS and small.serves(version, call):
            try:
                return await small.run(version, call, rows)
            except Exception as e:  # the engine failed this call, or is gone: torch runs it instead
                log.warning("a call of %d rows failed on ONNX Runtime (%s); running it on %s", len(rows), e,
                            "torch" if self.torch is not None else "the version's own sessions")
        if self.torch is None and not version.serves(call):
            raise NeedsFullInstall(f"version {version.name}:{version.version} has no ONNX graph for map coordinates (its projector, "
                                   f"{version.manifest.get('projector', {}).get('kind')}, does not export); {FULL_INSTALL}")
        return await self.threads.run(self.big, version, call, rows)

    def onnx_versions(self) -> int:
        return self.small.versions() if self.small is not None else 0

    def process_versions(self) -> int:
        return self.process.versions() if self.process is not None else 0

    async def _keep_process(self, process: EngineProcess) -> None:
        """Start a new engine process when the one running dies, and give it back the versions the dead one served.

        Meanwhile torch serves their small batches. Their graphs are exported again (the server keeps no copy), as for
        a new version. The wait before a restart doubles from RESTART_S[0] up to RESTART_S[1], and starts over once a
        child has lived that long.
        """
        delay, lost = RESTART_S[0], []
        while True:
            started = time.monotonic()
            lost += await process.wait_lost()
            if time.monotonic() - started > RESTART_S[1]:
                delay = RESTART_S[0]
            log.error("the engine process has exited; a new one starts in %.0f s (until then torch serves the small batches "
                      "of %d versions)", delay, len(lost))
            await asyncio.sleep(delay)
            delay = min(2 * delay, RESTART_S[1])
            try:
                await process.start()
            except OSError as e:
                log.error("cannot start the engine process: %s", e)
                continue
            versions, lost = lost, []
            if versions:
                await asyncio.to_thread(self._export_again, versions)

    def _export_again(self, versions: list[ModelVersion]) -> None:
        unstored = [v.folder for v in versions if not v.graphs]
        if not unstored or self.torch is None:
            self.adopt(None, versions)
            return
        from aeserve.service.runtime.torch_engine import one_torch_thread

        with one_torch_thread():  # nothing here needs more, and a second OpenMP team would slow the model threads
            self.adopt(GraphExport(unstored), versions)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        self.threads.close()
        if self.process is not None:
            await self.process.close()
