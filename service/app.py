"""The service app: the v1 operations' own lane, FastAPI for the other routes, the lifespan (load, warm, poll the
registry), the access log and the request metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TextIO

import orjson
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from aeserve.models.registry import open_registry
from aeserve.service.api import health, models, v2
from aeserve.service.api.errors import (
    V1,
    answer,
    http_error_handler,
    internal_error,
    protocol_of,
    service_error_handler,
    status_of,
    validation_error_handler,
)
from aeserve.service.api.v1 import operation_target, operations_openapi, serve_operation
from aeserve.service.auth import require_api_key
from aeserve.service.errors import Overloaded, ServiceError
from aeserve.service.indexes import Indexes
from aeserve.service.metrics import Metrics
from aeserve.service.runtime.batcher import Batcher
from aeserve.service.runtime.engines import Engines
from aeserve.service.runtime.store import ModelStore
from aeserve.service.settings import Settings

log = logging.getLogger("aeserve.service")
HEALTH_PATHS = ("/health/", "/v2/health/")
STATIC = Path(__file__).parent / "static"
ACCESS_FLUSH_S = 0.2


class AccessLog:
    """One JSON line per request, written to ``stream`` in one piece every ACCESS_FLUSH_S seconds.

    A ``logging`` call per request (a record, a formatter, a write and a flush under a lock) costs the single-row
    benchmark a large share of its rate; a line gathered here costs the event loop next to nothing (docs/serving.md,
    "Costs the code is shaped by").
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lines: list[bytes] = []

    def add(self, entry: dict) -> None:
        self._lines.append(orjson.dumps(entry))
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_later(ACCESS_FLUSH_S, self.flush)
            except RuntimeError:  # no event loop to flush later
                self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            stream = self.stream or sys.stderr
            stream.write(b"\n".join(lines).decode() + "\n")
            stream.flush()


async def _poll(app: FastAPI) -> None:
    store, seconds = app.state.store, app.state.settings.poll_seconds
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(store.refresh)
        except Exception:  # a broken registry must not stop polling or serving what is loaded
            log.exception("registry refresh failed")


async def _first_load(app: FastAPI) -> None:
    store, settings = app.state.store, app.state.settings
    await asyncio.to_thread(store.refresh)
    loaded = store.loaded()
    if loaded:
        log.info("ready on http://%s:%d: %d versions of %d models from %s (%s)", settings.host, settings.port, len(loaded),
                 len(store.names()), settings.registry, ", ".join(f"{name}:{version}" for name, version in loaded))
    else:
        log.warning("not ready: no models in %s; it is polled for new versions", settings.registry)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await app.state.engines.start()
    tasks = []
    tasks.append(asyncio.create_task(_first_load(app)))  # readiness flips once this is done
    if app.state.settings.poll_seconds > 0:
        tasks.append(asyncio.create_task(_poll(app)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.batcher.close()
        await app.state.engines.close()
        if app.state.access_log is not None:
            app.state.access_log.flush()


class ServiceApp:
    """The ASGI app: the operations (service/operations.py) go straight to their handler, every other request to FastAPI.

    On this hot path FastAPI's per-request routing, dependency solving and middleware stack cost more than the model
    call, so ``POST /v1/models/{name}[/versions/{version}]/{op}`` is dispatched directly (docs/serving.md, "Costs the
    code is shaped by"). Every HTTP request, either way, gets its metrics and one JSON access-log line. More than
    ``max_inflight`` requests in progress are refused as overloaded before their body is read, so an overload that
    outruns even parsing cannot pile up connections and memory; the health routes are never refused.
    ``api`` is the FastAPI app behind it and ``state`` its state.
    """

    def __init__(self, api: FastAPI, metrics: Metrics, access_log: AccessLog | None, max_inflight: int) -> None:
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
            if self.access_log is not None:
                self.access_log.add({"ts": round(time.time(), 3), "method": scope["method"], "path": scope["path"], "status": status,
                                     "ms": round(seconds * 1000, 3), **(context or {})})

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve one HTTP request; returns the status it answered."""
        path = scope["path"]
        if path.startswith(HEALTH_PATHS):
            return await self._fastapi(scope, receive, send)
        if self.inflight >= self.max_inflight:
            refused = Overloaded(f"overloaded: {self.inflight} requests are in progress; retry shortly", retry_after=1)
            await answer(refused, protocol_of(path))(scope, receive, send)
            return status_of(refused, protocol_of(path))
        self.inflight += 1
        try:
            target = operation_target(path)
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
        except ServiceError as e:
            await answer(e, V1)(scope, receive, send)
            return status_of(e, V1)
        except Exception:
            log.exception("operation %s failed", scope["path"])
            await internal_error(V1)(scope, receive, send)
            return 500


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
    app.state.engines = engines = Engines(device, settings.engine, settings.engine_process, settings.inference_threads)
    registry = open_registry(settings.registry, settings.cache)
    source = registry.mirror() if hasattr(registry, "mirror") else None  # a registry URL: serve from its local copy
    app.state.store = ModelStore(source.local if source else registry, device=device, engines=engines, only=settings.model_names, source=source)
    app.state.batcher = Batcher(engines.run, settings.max_batch_rows, settings.max_wait_ms / 1000, settings.max_queue,
                                on_batch=metrics.observe_batch)
    app.state.access_log = AccessLog() if settings.access_log else None
    app.state.indexes = Indexes(settings.index)  # IndexFileError (a ValueError) names a bad --index
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(models.router, dependencies=[Depends(require_api_key)])
    app.include_router(v2.health_router)
    app.include_router(v2.router, dependencies=[Depends(require_api_key)])
    app.openapi = lambda: _openapi_with_operations(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", _index, include_in_schema=False)
    return ServiceApp(app, metrics, app.state.access_log, settings.max_inflight)


async def _index() -> FileResponse:
    """The map explorer page."""
    return FileResponse(STATIC / "index.html")


def _openapi_with_operations(app: FastAPI) -> dict:
    """The OpenAPI document, made again when the loaded versions change (the operations' rows follow their shapes)."""
    store = app.state.store
    key = (store.loaded_once, store.generation)
    if app.openapi_schema is None or app.state.openapi_key != key:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema["paths"].update(operations_openapi(store, app.state.settings.max_rows))
        if app.state.indexes:
            from aeserve.service.api.neighbors import neighbors_openapi

            schema["paths"].update(neighbors_openapi(store, app.state.indexes, app.state.settings.max_rows))
        app.openapi_schema, app.state.openapi_key = schema, key
    return app.openapi_schema
