"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

from aeserve.service.auth import require_api_key
from aeserve.service.codec import json_bytes
from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> Response:
    """200 while the process runs."""
    return Response(json_bytes({"status": "live"}), media_type="application/json")


@router.get("/health/ready", responses={503: {"description": "not ready: loading, no models, or draining"}})
async def ready(request: Request) -> Response:
    """200 when models are loaded and warmed up, else 503."""
    state = request.app.state
    store = state.store
    if state.draining:
        reason = "shutting down"
    elif not store.loaded_once:
        reason = "loading models"
    elif not store.names():
        reason = f"no models loaded from {store.registry.root}"
    else:
        return Response(json_bytes({"status": "ready", "models": store.names()}), media_type="application/json")
    return Response(json_bytes({"status": "not ready", "detail": reason}), status_code=503, media_type="application/json",
                    headers={"Retry-After": "1"})


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=PlainTextResponse,
            responses={401: {"description": "missing or wrong API key"}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = request.app.state.metrics
    m.queue_depth.set(request.app.state.batcher.pending)
    m.loaded.set(len(request.app.state.store.loaded()))
    process = request.app.state.engine_process
    in_process = process.versions() if process is not None else 0
    m.on_onnx.set(request.app.state.store.on_onnx() + in_process)
    m.in_engine_process.set(in_process)
    m.refused.set(len(request.app.state.store.failed))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
