"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import State
from starlette.responses import PlainTextResponse, Response

from aeserve.service.auth import require_api_key
from aeserve.service.codec import json_bytes

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> Response:
    """200 while the process runs."""
    return Response(json_bytes({"status": "live"}), media_type="application/json")


def readiness(state: State) -> str | None:
    """Why the service is not ready (loading, no models, draining), or None when it is: both protocols ask this."""
    store = state.store
    if state.draining:
        return "shutting down"
    if not store.loaded_once:
        return "loading models"
    if not store.names():
        return f"no models loaded from {store.registry.location}"
    return None


@router.get("/health/ready", responses={503: {"description": "not ready: loading, no models, or draining"}})
async def ready(request: Request) -> Response:
    """200 when models are loaded and warmed up, else 503."""
    reason = readiness(request.app.state)
    if reason is None:
        return Response(json_bytes({"status": "ready", "models": request.app.state.store.names()}), media_type="application/json")
    return Response(json_bytes({"status": "not ready", "detail": reason}), status_code=503, media_type="application/json",
                    headers={"Retry-After": "1"})


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=PlainTextResponse,
            responses={401: {"description": "missing or wrong API key"}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = request.app.state.metrics
    state = request.app.state
    m.queue_depth.set(state.batcher.pending)
    m.loaded.set(len(state.store.loaded()))
    m.on_onnx.set(state.engines.onnx_versions())
    m.in_engine_process.set(state.engines.process_versions())
    m.refused.set(len(state.store.failed))
    store = state.store
    if store.source is not None:
        remote = m.remote()
        remote["reachable"].set(1 if store.source_reachable else 0)
        remote["errors"].set(store.source_errors)
        remote["synced"].set(store.source_synced_at)
        remote["fetched"].set(store.source.bytes_fetched)
        remote["removed"].set(store.source_removed)
        remote["replaced"].set(store.source_replaced)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
