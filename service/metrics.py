"""Prometheus metrics, one registry per app so that several apps (tests) never share counters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version", "op", "status"]
        self.requests = Counter("aeserve_requests", "HTTP requests by model, version, operation and status", labels, registry=self.registry)
        self.latency = Histogram("aeserve_request_seconds", "request latency in seconds", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("aeserve_batch_rows", "rows per model call", buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("aeserve_queue_depth", "requests waiting for or inside a model call", registry=self.registry)
        self.loaded = Gauge("aeserve_loaded_versions", "model versions loaded and serving", registry=self.registry)
        self.refused = Gauge("aeserve_refused_versions", "model versions that failed to load", registry=self.registry)
        self._children: dict[tuple[str, str, str, str], tuple] = {}

    def observe_request(self, model: str, version: str, op: str, status: str, seconds: float) -> None:
        # labels() validates and looks up under a lock on every call; on the hot path that cost a fifth
        # of the request rate, so each label set's children are looked up once and kept.
        key = (model, version, op, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)
