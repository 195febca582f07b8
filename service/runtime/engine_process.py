"""The engine process: small batches on ONNX Runtime in a child process that the event loop feeds directly.

In the server alone, every small batch went to a model thread and back: the
thread woke, waited for the GIL that the busy event loop held, ran the graph,
took the GIL back and handed the answer over. Here the loop writes the rows to
a socket, and the child, which shares no GIL with it, answers on that socket;
the loop reads it like any other connection, with no model thread blocked on
it in between (the measurements: docs/serving.md, "Costs the code is shaped
by").

The child imports numpy and ONNX Runtime, not torch, and runs the same code as
the in-process ONNX engine (``onnx.py``), so its answers are that engine's, bit
for bit. If the child dies, calls in flight are retried on torch in the server
and later calls stay there (logged, and ``aeserve_engine_process_versions``
drops) until the engines have started a new child and exported its versions
again (``engines.py``).

Protocol, over a Unix socket pair; the child answers each request before it
reads the next, so answers come in the order of the requests:

- request: ``REQUEST`` (request type, packed call, slot, rows, payload bytes),
  then the payload: for LOAD, a JSON description (graph sizes, preprocessing,
  the anomaly score: held-out quantiles, its manifest section and the shapes of its fitted arrays)
  and the graphs' ONNX bytes, then the anomaly score's arrays as float32; for CALL, the rows as
  float32. The packed call (``pack_call``) is a ``Call`` in 64 bits: bit 0 for
  rows of codes, then each wanted output as its index in ``OUTPUTS`` plus one,
  in as many bits as the largest such number needs.
- answer: ``ANSWER`` (status, payload bytes), then the outputs as float32, one
  after the other, or an error message.

Nothing is pickled.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from aeserve.models.anomaly import from_manifest
from aeserve.models.outputs import OUTPUTS, Call
from aeserve.models.preprocessing import Preprocessing
from aeserve.service.runtime.onnx import OnnxVersion, graphs_serve

if TYPE_CHECKING:
    from aeserve.models.version import ModelVersion

log = logging.getLogger("aeserve.engine")

REQUEST = struct.Struct("<BQIII")  # request type, packed call, slot, rows, payload bytes
ANSWER = struct.Struct("<BI")  # status, payload bytes
LOAD, CALL = 0, 1  # request types
PACKED_CALL_BITS = 64  # REQUEST's "Q"
OK, FAILED = 0, 1
LOAD_TIMEOUT_S = 120.0


class EngineProcessError(RuntimeError):
    """The engine process refused a request, or is gone."""


OUTPUT_NAMES = list(OUTPUTS)


def pack_call(call: Call) -> int:
    """``call`` as one number for REQUEST: bit 0 for rows of codes, then each output's index in OUTPUT_NAMES plus one
    (0 ends the list), each in the bits the largest index needs: a new output widens them, and never wraps into the
    next. ValueError when the outputs do not fit in PACKED_CALL_BITS."""
    width = len(OUTPUT_NAMES).bit_length()
    if 1 + width * len(call.outputs) > PACKED_CALL_BITS:
        raise ValueError(f"a call of {len(call.outputs)} outputs, {width} bits each, does not fit the engine process's "
                         f"{PACKED_CALL_BITS}-bit call field; widen REQUEST's call field")
    packed = int(call.takes == "codes")
    for i, name in enumerate(call.outputs):
        packed |= (OUTPUT_NAMES.index(name) + 1) << (1 + width * i)
    return packed


def unpack_call(packed: int) -> Call:
    width = len(OUTPUT_NAMES).bit_length()
    outputs, rest = [], packed >> 1
    while rest:
        outputs.append(OUTPUT_NAMES[(rest & ((1 << width) - 1)) - 1])
        rest >>= width
    return Call("codes" if packed & 1 else "inputs", tuple(outputs))


class LoadedVersion(NamedTuple):
    """A version loaded into the child: held, so that its id() is not reused; its slot there; the graphs it has."""

    version: ModelVersion
    slot: int
    graphs: frozenset[str]


class EngineProcess:
    """The server's side of the engine process: start the child, load versions into it, run their calls there."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None
        self._channel: _Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._versions: dict[int, LoadedVersion] = {}  # by id(version)
        self._slots = 0

    async def start(self) -> None:
        """Start the child on the running loop (it imports ONNX Runtime while the server loads its models)."""
        parent, child = socket.socketpair()
        try:
            self._child = subprocess.Popen([sys.executable, "-m", "aeserve.service.runtime.engine_process", str(child.fileno())],
                                           pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child.close()
        self._loop = asyncio.get_running_loop()
        _, self._channel = await self._loop.create_unix_connection(_Channel, sock=parent)

    @property
    def up(self) -> bool:
        return self._channel is not None and self._channel.lost is None

    def versions(self) -> int:
        """How many versions run their small batches here now."""
        return len(self._versions) if self.up else 0

    async def wait_lost(self) -> list[ModelVersion]:
        """Wait until the child has exited; the versions it served (torch in the server serves them now)."""
        if self._channel is not None:
            await asyncio.shield(self._channel.closed)
        versions = [loaded.version for loaded in self._versions.values()]
        self._versions.clear()
        return versions

    async def load(self, version: ModelVersion, graphs: dict[str, bytes]) -> None:
        """Load ``version``'s graphs (name -> ONNX bytes); its small calls come here once this returns."""
        if not self.up:
            raise EngineProcessError("the engine process is not running")
        slot, self._slots = self._slots, self._slots + 1
        arrays = {name: np.ascontiguousarray(array, np.float32) for name, array in version.anomaly.tensors().items()}
        description = json.dumps({"graphs": [[name, len(data)] for name, data in graphs.items()],
                                  "preprocessing": version.preprocessing.to_wire(),
                                  "quantiles": version.anomaly.quantiles.tolist(),
                                  "anomaly": version.anomaly.section(),
                                  "arrays": [[name, list(array.shape)] for name, array in arrays.items()]}).encode()
        parts = [struct.pack("<I", len(description)), description, *graphs.values(), *(array.tobytes() for array in arrays.values())]
        await self._channel.send(LOAD, 0, slot, 0, parts, lambda answer: None)
        self._versions[id(version)] = LoadedVersion(version, slot, frozenset(graphs))

    def take(self, version: ModelVersion, graphs: dict[str, bytes]) -> None:
        """From another thread (the registry refresh): ``load`` the version; if that fails, torch serves it (logged)."""
        key = f"{version.name}:{version.version}"
        try:
            asyncio.run_coroutine_threadsafe(self.load(version, graphs), self._loop).result(LOAD_TIMEOUT_S)
        except (EngineProcessError, FutureTimeout, RuntimeError, OSError) as e:
            log.warning("small batches of %s stay on torch: %s", key, e)
            return
        log.info("small batches of %s run in the engine process", key)

    def serves(self, version: ModelVersion, call: Call) -> bool:
        loaded = self._versions.get(id(version))
        return loaded is not None and graphs_serve(loaded.graphs, call) and self.up

    def run(self, version: ModelVersion, call: Call, rows: np.ndarray) -> asyncio.Future:
        """``call`` on ``rows`` in the child; the future gets the outputs as a tuple of arrays."""
        slot = self._versions[id(version)].slot
        n = len(rows)
        shapes = tuple(OUTPUTS[name].row_shape(version) for name in call.outputs)
        data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
        return self._channel.send(CALL, pack_call(call), slot, n, [data], lambda answer: _outputs(n, shapes, answer))

    async def close(self) -> None:
        """Close the socket (the child exits on its end) and wait for the child."""
        if self._channel is not None:
            self._channel.close()
        if self._child is not None:
            try:
                await asyncio.to_thread(self._child.wait, 5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                await asyncio.to_thread(self._child.wait)


def _outputs(n: int, row_shapes: tuple[tuple[int, ...], ...], answer: bytes | bytearray | memoryview) -> tuple[np.ndarray, ...]:
    """An answer's float32 numbers as arrays of ``n`` rows of each shape, one after the other."""
    flat = np.frombuffer(answer, dtype=np.float32)
    sizes = [n * math.prod(shape) for shape in row_shapes]
    if sum(sizes) != len(flat):
        raise EngineProcessError(f"the engine process answered {len(flat)} numbers for {n} rows, expected {sum(sizes)}")
    outputs, start = [], 0
    for size, shape in zip(sizes, row_shapes, strict=True):
        outputs.append(flat[start:start + size].reshape(n, *shape))
        start += size
    return tuple(outputs)


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Channel(asyncio.Protocol):
    """The loop's end of the socket: requests out, answers in, matched in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: EngineProcessError | None = None
        self.closed = asyncio.get_running_loop().create_future()  # done once the connection is gone
        self._waiting: deque[tuple[asyncio.Future, Callable[[Any], Any]]] = deque()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, request_type: int, packed_call: int, slot: int, rows: int, parts: list[bytes],
             finish: Callable[[Any], Any]) -> asyncio.Future:
        """Send one request whose payload is ``parts``; the future gets ``finish(answer payload)``, or EngineProcessError."""
        if self.lost is not None:
            raise self.lost
        future = asyncio.get_running_loop().create_future()
        header = REQUEST.pack(request_type, packed_call, slot, rows, sum(len(part) for part in parts))
        if len(parts) == 1:
            self.transport.write(header + parts[0])  # a call: one write
        else:
            self.transport.writelines([header, *parts])  # a version's graphs: megabytes, not joined first
        self._waiting.append((future, finish))
        return future

    def data_received(self, data: bytes) -> None:
        if not self._buffer and len(data) >= ANSWER.size and ANSWER.unpack_from(data)[1] + ANSWER.size == len(data):
            self._answer(data[0], memoryview(data)[ANSWER.size:])  # the usual case: one whole answer, not copied
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= ANSWER.size:
            status, size = ANSWER.unpack_from(buffer)
            end = ANSWER.size + size
            if len(buffer) < end:
                return
            payload = buffer[ANSWER.size:end]
            del buffer[:end]
            self._answer(status, payload)

    def _answer(self, status: int, payload: bytes | bytearray | memoryview) -> None:
        future, finish = self._waiting.popleft()
        if future.done():  # cancelled while the child worked
            return
        if status != OK:
            future.set_exception(EngineProcessError(bytes(payload).decode(errors="replace")))
            return
        try:
            future.set_result(finish(payload))
        except EngineProcessError as e:
            future.set_exception(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = EngineProcessError("the engine process has exited")
        if self._waiting:
            log.error("the engine process exited with %d calls in flight; small batches now run in the server process", len(self._waiting))
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# The child's side.


def _load(payload: memoryview) -> OnnxVersion:
    (size,) = struct.unpack_from("<I", payload)
    description = json.loads(bytes(payload[4:4 + size]))
    graphs, start = {}, 4 + size
    for name, length in description["graphs"]:
        graphs[name] = bytes(payload[start:start + length])
        start += length
    arrays = {}
    for name, shape in description["arrays"]:
        arrays[name] = np.frombuffer(payload, np.float32, math.prod(shape), start).reshape(shape).copy()
        start += 4 * math.prod(shape)
    anomaly = from_manifest(description["anomaly"], description["quantiles"], arrays)
    loaded = OnnxVersion(graphs, Preprocessing.from_dict(description["preprocessing"]), anomaly)
    del graphs
    loaded.warm()
    return loaded


def _receive(sock: socket.socket, size: int) -> memoryview | None:
    """Exactly ``size`` bytes, or None if the server closed its end first."""
    view = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return view


def serve(sock: socket.socket) -> None:
    """Answer requests until the server closes its end."""
    versions: dict[int, OnnxVersion] = {}
    while (header := _receive(sock, REQUEST.size)) is not None:
        request_type, packed_call, slot, rows, size = REQUEST.unpack(header)
        payload = _receive(sock, size)
        if payload is None:
            return
        try:
            if request_type == LOAD:
                versions[slot] = _load(payload)
                del payload
                release_freed_memory()  # the graphs' bytes, now inside the sessions
                outputs: tuple[np.ndarray, ...] = ()
            else:
                x = np.frombuffer(payload, dtype=np.float32).reshape(rows, -1)
                outputs = versions[slot].run(unpack_call(packed_call), x)
        except Exception as e:  # onnxruntime's own error types among them; the server falls back for this call
            message = f"{type(e).__name__}: {e}".encode()
            sock.sendall(ANSWER.pack(FAILED, len(message)) + message)
            continue
        data = b"".join(np.ascontiguousarray(o, dtype=np.float32).tobytes() for o in outputs)
        sock.sendall(ANSWER.pack(OK, len(data)) + data)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server decides when to stop
    serve(socket.socket(fileno=int(sys.argv[1])))
