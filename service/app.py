"""The FastAPI app: state, lifespan (load, warm, poll the registry), auth, access log and metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import orjson
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.registry import Registry
from service.api import health, models
from service.auth import require_api_key
from service.batching import Batcher
from service.errors import ApiError, api_error_handler, http_error_handler, validation_error_handler
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore

log = logging.getLogger("aeserve.service")
access_log = logging.getLogger("aeserve.access")


class AccessLog:
    """Pure ASGI middleware: one JSON log line and the request metrics per HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, enabled: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - started
            context = scope.get("aeserve")
            if context is not None:
                labels = (context.get("model", ""), context.get("version", ""), context.get("op", ""), str(status))
                self.metrics.requests.labels(*labels).inc()
                self.metrics.latency.labels(*labels).observe(seconds)
            if self.enabled:
                access_log.info(orjson.dumps({
                    "method": scope["method"], "path": scope["path"], "status": status, "ms": round(seconds * 1000, 3),
                    **(context or {}),
                }).decode())


async def _poll(app: FastAPI) -> None:
    store, seconds = app.state.store, app.state.settings.poll_seconds
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(store.refresh)
        except Exception:  # a broken registry must not stop polling or serving what is loaded
            log.exception("registry refresh failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(asyncio.to_thread(app.state.store.refresh))]  # readiness flips once this is done
    if app.state.settings.poll_seconds > 0:
        tasks.append(asyncio.create_task(_poll(app)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.batcher.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="aeserve", version="1", lifespan=lifespan,
                  description="Autoencoders as a service: encode, decode, reconstruct (with anomaly scores) and project.")
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    app.state.store = ModelStore(Registry(settings.registry), device=settings.resolved_device(), only=settings.model_names)
    app.state.batcher = Batcher(settings.max_batch_rows, settings.max_wait_ms / 1000, settings.max_queue,
                                settings.inference_threads, on_batch=metrics.batch_rows.observe)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(models.router, dependencies=[Depends(require_api_key)])
    app.add_middleware(AccessLog, metrics=metrics, enabled=settings.access_log)
    return app
