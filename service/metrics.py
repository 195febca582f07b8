"""Prometheus metrics, one registry per app so that several apps (tests) never share counters."""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from aeserve.models.outputs import Call

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
REQUEST_LABELS = ["model", "version", "op", "status"]
# Served percentiles: the tail in fine steps, where a drift into the unusual shows first.
PERCENTILE_BUCKETS = (10, 25, 50, 75, 90, 95, 99, 99.9)


class RequestCollector:
    """Requests and their latency by model, version, operation and status.

    Every request adds to these, so they are plain counters that the event
    loop, their only writer, updates without locks: a count, a sum and one
    slot per latency bucket. A scrape (on the same loop) turns them into
    ``aeserve_requests_total`` and the ``aeserve_request_seconds`` histogram.
    prometheus_client's own Counter and Histogram take a lock on each of their
    values; on single-row requests that cost as much as reading the body.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str], list] = {}  # labels -> [count, sum, per-bucket counts (+Inf last)]

    def observe(self, labels: tuple[str, str, str, str], seconds: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
        series[0] += 1
        series[1] += seconds
        series[2][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("aeserve_requests", "HTTP requests by model, version, operation and status", labels=REQUEST_LABELS)
        latency = HistogramMetricFamily("aeserve_request_seconds", "request latency in seconds", labels=REQUEST_LABELS)
        bounds = [str(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
        for labels, (count, total, buckets) in list(self._series.items()):
            requests.add_metric(list(labels), count)
            latency.add_metric(list(labels), list(zip(bounds, itertools.accumulate(buckets), strict=True)), total)
        yield requests
        yield latency


class PercentileCollector:
    """``aeserve_percentiles``: a histogram of the percentiles served (reconstruct, v1 and v2), by model and version.

    Each model call adds its rows at once (``numpy.searchsorted`` into the buckets), on the event loop, its only
    writer: an operator watches the share of traffic in the top buckets move when the data drifts.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], list] = {}  # (model, version) -> [sum, per-bucket counts (+Inf last)]

    def observe(self, model: str, version: str, percentiles: np.ndarray) -> None:
        series = self._series.get((model, version))
        if series is None:
            series = self._series[model, version] = [0.0, np.zeros(len(PERCENTILE_BUCKETS) + 1, np.int64)]
        series[0] += float(np.sum(percentiles, dtype=np.float64))
        series[1] += np.bincount(np.searchsorted(PERCENTILE_BUCKETS, percentiles, side="left"), minlength=len(PERCENTILE_BUCKETS) + 1)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily("aeserve_percentiles", "anomaly percentiles served (0-100; near 100: unlike the held-out rows), "
                                       "by model and version", labels=["model", "version"])
        bounds = [str(float(b)) for b in PERCENTILE_BUCKETS] + ["+Inf"]
        for labels, (total, buckets) in list(self._series.items()):
            family.add_metric(list(labels), list(zip(bounds, map(int, np.cumsum(buckets)), strict=True)), total)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestCollector()
        self.registry.register(self.requests)
        self.percentiles = PercentileCollector()
        self.registry.register(self.percentiles)
        self.batch_rows = Histogram("aeserve_batch_rows", "rows per model call", buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_seconds = Histogram("aeserve_model_call_seconds", "seconds per model call, from the event loop handing the rows over "
                                       "to the outputs coming back (the rest of a request's time is HTTP, parsing and queueing)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("aeserve_queue_depth", "requests waiting for or inside a model call", registry=self.registry)
        self.loaded = Gauge("aeserve_loaded_versions", "model versions loaded and serving", registry=self.registry)
        self.on_onnx = Gauge("aeserve_onnx_engine_versions", "loaded versions whose small batches run on ONNX Runtime (in the server or the engine process)",
                             registry=self.registry)
        self.in_engine_process = Gauge("aeserve_engine_process_versions", "loaded versions whose small batches run in the engine process",
                                       registry=self.registry)
        self.refused = Gauge("aeserve_refused_versions", "model versions that failed to load", registry=self.registry)
        self._remote: dict[str, Gauge] | None = None

    def remote(self) -> dict[str, Gauge]:
        """Gauges of a registry URL (object storage), made on first use so that a local registry shows none."""
        if self._remote is None:
            self._remote = {
                "reachable": Gauge("aeserve_registry_reachable", "1 when the last poll of the registry URL reached the store, "
                                   "0 when it failed (the local copy serves meanwhile)", registry=self.registry),
                "errors": Gauge("aeserve_registry_errors", "failed polls of the registry URL since start", registry=self.registry),
                "synced": Gauge("aeserve_registry_last_sync_timestamp_seconds", "when a poll of the registry URL last succeeded", registry=self.registry),
                "fetched": Gauge("aeserve_registry_fetched_bytes", "bytes downloaded from the registry URL since start", registry=self.registry),
                "removed": Gauge("aeserve_registry_removed_versions", "versions taken out of the local copy since start, and no "
                                 "longer served, because the store no longer holds them (deleted there, or refused other "
                                 "contents under their number)", registry=self.registry),
                "replaced": Gauge("aeserve_registry_replaced_versions", "versions in the local copy replaced since start, and "
                                  "loaded again, because the store holds other contents under their number", registry=self.registry),
            }
        return self._remote

    def observe_batch(self, version: Any, call: Call, outputs: tuple[np.ndarray, ...], seconds: float) -> None:
        """One model call of ``version`` (a ModelVersion): its rows and seconds, and the percentiles it served."""
        self.batch_rows.observe(len(outputs[0]))
        self.model_seconds.observe(seconds)
        if "percentile" in call.outputs:
            self.percentiles.observe(version.name, str(version.version), outputs[call.outputs.index("percentile")])

    def observe_request(self, model: str, version: str, op: str, status: int, seconds: float) -> None:
        self.requests.observe((model, version, op, str(status)), seconds)
