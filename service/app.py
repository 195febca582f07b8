"""The service app: FastAPI routes, the operations' fast lane, lifespan (load, warm, poll the registry), access log, metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import torch
from aeserve.models.registry import Registry
from aeserve.service.api import health, models, v2
from aeserve.service.api.operations import operation_target, operations_openapi, serve_operation
from aeserve.service.auth import require_api_key
from aeserve.service.batching import Batcher
from aeserve.service.engine_process import EngineProcess
from aeserve.service.errors import ApiError, api_error_handler, error_response, http_error_handler, overloaded, validation_error_handler
from aeserve.service.metrics import Metrics
from aeserve.service.settings import Settings
from aeserve.service.store import ModelStore
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("aeserve.service")
HEALTH_PATHS = ("/health/", "/v2/health/")
ENGINE_RESTART_S = (5.0, 600.0)  # the first wait before a dead engine process is replaced, and the longest
STATIC = Path(__file__).parent / "static"
access_log = logging.getLogger("aeserve.access")


async def _poll(app: FastAPI) -> None:
    store, seconds = app.state.store, app.state.settings.poll_seconds
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(store.refresh)
        except Exception:  # a broken registry must not stop polling or serving what is loaded
            log.exception("registry refresh failed")


async def _keep_engine_process(process: EngineProcess, store: ModelStore) -> None:
    """Start a new engine process when the one running dies, and give it back the versions the dead one served.

    Meanwhile torch in the server serves their small batches. Their graphs are exported again (the server keeps no
    copy: about 11 MB per version for the default model), as for a new version. The wait before a restart doubles
    from ENGINE_RESTART_S[0] up to ENGINE_RESTART_S[1], and starts over once a child has lived that long.
    """
    delay, lost = ENGINE_RESTART_S[0], []
    while True:
        started = time.monotonic()
        lost += await process.wait_lost()
        if time.monotonic() - started > ENGINE_RESTART_S[1]:
            delay = ENGINE_RESTART_S[0]
        log.error("the engine process has exited; a new one starts in %.0f s (until then torch in the server serves the "
                  "small batches of %d versions)", delay, len(lost))
        await asyncio.sleep(delay)
        delay = min(2 * delay, ENGINE_RESTART_S[1])
        try:
            await process.start()
        except OSError as e:
            log.error("cannot start the engine process: %s", e)
            continue
        versions, lost = lost, []
        if versions:
            await asyncio.to_thread(store.export_again, versions)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    process = app.state.engine_process
    tasks = []
    if process is not None:
        try:
            await process.start()
            app.state.store.on_engine = process.take
            tasks.append(asyncio.create_task(_keep_engine_process(process, app.state.store)))
        except OSError as e:
            log.warning("small batches stay in the server process: cannot start the engine process: %s", e)
    tasks.append(asyncio.create_task(asyncio.to_thread(app.state.store.refresh)))  # readiness flips once this is done
    if app.state.settings.poll_seconds > 0:
        tasks.append(asyncio.create_task(_poll(app)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.batcher.close()
        if process is not None:
            await process.close()


class ServiceApp:
    """The ASGI app: the four operations go straight to their handler, every other request to FastAPI.

    On this hot path FastAPI's per-request routing, dependency solving and
    middleware stack cost more than the model call; dispatching
    ``POST /v1/models/{name}[/versions/{version}]/{op}`` directly roughly
    doubled the single-row request rate (see benchmarks/serve.py). Every HTTP
    request, either way, gets its metrics and one JSON access-log line.
    More than ``max_inflight`` requests in progress get 503 before their body
    is read, so an overload that outruns even parsing cannot pile up
    connections and memory; the health routes are never refused.
    ``api`` is the FastAPI app behind it and ``state`` its state.
    """

    def __init__(self, api: FastAPI, metrics: Metrics, access_log: bool, max_inflight: int) -> None:
        self.api = api
        self.state = api.state
        self.metrics = metrics
        self.access_log = access_log
        self.max_inflight = max_inflight
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        try:
            status = await self._dispatch(scope, receive, send)
        finally:
            seconds = time.perf_counter() - started
            context = scope.get("aeserve")
            if context is not None:
                self.metrics.observe_request(context.get("model", ""), context.get("version", ""), context.get("op", ""), status, seconds)
            if self.access_log:
                access_log.info(orjson.dumps({
                    "method": scope["method"], "path": scope["path"], "status": status, "ms": round(seconds * 1000, 3),
                    **(context or {}),
                }).decode())

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve one HTTP request; returns the status it answered."""
        path = scope["path"]
        if path.startswith(HEALTH_PATHS):
            return await self._fastapi(scope, receive, send)
        if self.inflight >= self.max_inflight:
            await overloaded(self.inflight, path)(scope, receive, send)
            return 503
        self.inflight += 1
        try:
            target = operation_target(path) if scope["method"] == "POST" else None
            if target is None:
                return await self._fastapi(scope, receive, send)
            return await self._operation(scope, receive, send, target)
        finally:
            self.inflight -= 1

    async def _fastapi(self, scope: Scope, receive: Receive, send: Send) -> int:
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.api(scope, receive, send_and_record)
        return status

    async def _operation(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, str, str]) -> int:
        try:
            await serve_operation(self.state, scope, receive, send, *target)
            return 200
        except ApiError as e:
            await error_response(e.status, e.detail, e.headers)(scope, receive, send)
            return e.status
        except Exception:
            log.exception("operation %s failed", scope["path"])
            await error_response(500, "internal error; the server log has the details")(scope, receive, send)
            return 500


class IntraOpThreads:
    """Torch's CPU threads for a model call of ``rows`` rows: one below SPLIT_ROWS, all of them above.

    On 2 cores the default MLP's encode of one row takes 0.47 ms on one thread
    and 1.31 ms on two: waking the second thread costs more than it saves.
    From about 64 rows the split pays (benchmarks/model_threads.py). Small
    batches are also what a busy server runs, and there the event loop needs
    the other core.
    """

    SPLIT_ROWS = 64

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __call__(self, rows: int) -> None:
        wanted = 1 if rows < self.SPLIT_ROWS else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)


def create_app(settings: Settings | None = None) -> ServiceApp:
    """The service as an ASGI app; ``.api`` is the FastAPI app behind it, ``.state`` its state."""
    settings = settings or Settings()
    app = FastAPI(title="aeserve", version="1", lifespan=lifespan,
                  description="Autoencoders as a service: encode, decode, reconstruct (with anomaly scores) and project.")
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    device = settings.resolved_device()
    app.state.store = ModelStore(Registry(settings.registry), device=device, engine=settings.engine, only=settings.model_names)
    use_process = settings.engine == "onnx" and settings.engine_process and device == "cpu"
    app.state.engine_process = EngineProcess() if use_process else None
    app.state.batcher = Batcher(settings.max_batch_rows, settings.max_wait_ms / 1000, settings.max_queue,
                                settings.inference_threads, on_batch=metrics.observe_batch,
                                before_call=IntraOpThreads(torch.get_num_threads()), remote=app.state.engine_process)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(models.router, dependencies=[Depends(require_api_key)])
    app.include_router(v2.health_router)
    app.include_router(v2.router, dependencies=[Depends(require_api_key)])
    app.openapi = lambda: _openapi_with_operations(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", _index, include_in_schema=False)
    return ServiceApp(app, metrics, settings.access_log, settings.max_inflight)


async def _index() -> FileResponse:
    """The map explorer page."""
    return FileResponse(STATIC / "index.html")


def _openapi_with_operations(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema["paths"].update(operations_openapi())
        app.openapi_schema = schema
    return app.openapi_schema
