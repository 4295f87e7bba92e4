"""Prometheus metrics of one cloud worker, in its own registry.

A registry per worker (not the process-global one) lets several workers, agents and
tests live in one process without their metrics colliding.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "CloudMetrics"]

_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CloudMetrics:
    """Counters, gauges and histograms of a worker; ``render()`` gives the text format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "fogline_cloud_received", "Feature messages received from the broker.", registry=r
        )
        self.rejected = Counter(
            "fogline_cloud_rejected",
            "Messages rejected without an answer, by reason.",
            ["reason"],
            registry=r,
        )
        self.results = Counter(
            "fogline_cloud_results", "Results published, by status.", ["status"], registry=r
        )
        self.batch_size = Histogram(
            "fogline_cloud_batch_size", "Items per batch run.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "fogline_cloud_queue_depth", "Items waiting to be batched.", registry=r
        )
        self.queue_seconds = Histogram(
            "fogline_cloud_queue_seconds",
            "Time an item waited from receipt to the start of its batch.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "fogline_cloud_compute_seconds",
            "Backend time per batch.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.store_errors = Counter(
            "fogline_cloud_store_errors", "Result batches the store failed to write.", registry=r
        )
        self.ready = Gauge("fogline_cloud_ready", "1 when the worker is ready.", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this worker's metrics."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent); handy for status pages and tests."""
        got = self.registry.get_sample_value(name, labels or {})
        return float(got) if got is not None else 0.0
