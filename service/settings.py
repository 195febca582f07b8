"""Service settings: one class, filled from flags and AESERVE_* environment variables."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aeserve.models.storage import DEFAULT_REGISTRY


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AESERVE_", extra="ignore")

    registry: str = Field(default=DEFAULT_REGISTRY, description="registry: a folder, or a URL (s3://bucket/prefix, gs://bucket/prefix, file://...)")
    cache: Path | None = Field(default=None, description="where versions from a registry URL are copied, verified by sha256 (unset: ~/.cache/aeserve)")
    host: str = Field(default="127.0.0.1", description="address to bind; 0.0.0.0 exposes the service to the network")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="where models run; auto: a GPU when there is one")
    engine: Literal["onnx", "torch"] = Field(
        default="onnx", description="onnx: on the CPU, calls under 128 rows run on ONNX Runtime (torch runs the rest); torch: torch only")
    engine_process: bool = Field(
        default=True, description="with the onnx engine: run small batches in a child process that the event loop feeds (no shared GIL)")
    api_key: str | None = Field(default=None, description="when set, every route but /health/* needs 'Authorization: Bearer KEY'")
    models: str = Field(default="", description="comma-separated model names to serve (empty: all)")

    max_body_bytes: int = Field(default=64 * 2**20, gt=0, description="request bodies above this size get 413")
    max_rows: int = Field(default=65_536, gt=0, description="most rows in one request")
    max_batch_rows: int = Field(default=256, gt=0, description="most rows the batcher sends to a model at once")
    max_wait_ms: float = Field(default=0.0, ge=0, description="how long the batcher waits for more rows; 0 batches only what is already queued")
    max_queue: int = Field(default=512, gt=0, description="requests waiting for a model beyond this get 503 with Retry-After")
    max_inflight: int = Field(default=1024, gt=0, description="requests in progress beyond this (health routes aside) get 503 with Retry-After at once")
    inference_threads: int = Field(default=1, gt=0, description="threads that run model calls")
    poll_seconds: float = Field(default=2.0, ge=0, description="how often to look for new versions (0: only on POST /v1/reload)")
    drain_grace_seconds: float = Field(default=2.0, ge=0, description="after SIGTERM: readiness 503 but still serving, for this long")
    drain_seconds: float = Field(default=10.0, ge=0, description="then: how long to wait for requests in flight")
    access_log: bool = Field(default=True, description="one JSON line per request on stderr")

    @field_validator("registry", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def resolved_device(self) -> str:
        from aeserve.models.served import torch_installed

        if not torch_installed():  # the slim install: ONNX Runtime on the CPU
            if self.device == "cuda":
                raise ValueError("--device cuda needs torch, which is not installed here; install aeserve with torch, or use --device cpu")
            return "cpu"
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
        return self.device
