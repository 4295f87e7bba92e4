"""Prometheus metrics of one cloud worker, in its own registry.

A registry per worker (not the process-global one) lets several workers, agents and
tests live in one process without their metrics colliding.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fogline.messaging import ThreadFailures

__all__ = ["CLOUD_THREAD_KINDS", "CONTENT_TYPE_LATEST", "CloudMetrics", "ModelMetrics"]

#: The long-lived threads of a worker and its model repository, as
#: ``fogline_cloud_thread_failures_total`` labels them.
CLOUD_THREAD_KINDS = (
    "store",
    "scheduler",
    "mqtt",
    "mqtt_handler",
    "http",
    "bundles",
    "rollout_tick",
)

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
# A write transaction takes milliseconds when all is well and seconds to minutes behind a
# lock or a busy timeout; the buckets cover both.
_STORE_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


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
        self.store_write_seconds = Histogram(
            "fogline_cloud_store_write_seconds",
            "Time per write transaction of the result store (each attempt, failed ones too).",
            buckets=_STORE_BUCKETS_S,
            registry=r,
        )
        self.store_waiting = Gauge(
            "fogline_cloud_store_waiting",
            "Results handed to the store writer and not yet written.",
            registry=r,
        )
        self.store_stalled = Gauge(
            "fogline_cloud_store_stalled",
            "1 while results wait and no write has completed for store.stall_after_s.",
            registry=r,
        )
        self.thread_failures = ThreadFailures(
            "fogline_cloud_thread_failures",
            "Failures that escaped the work of a long-lived thread, by thread kind (logged; "
            "the thread carried on, or the worker reported not ready for good).",
            CLOUD_THREAD_KINDS,
        )
        r.register(self.thread_failures)
        self.duplicates = Counter(
            "fogline_cloud_duplicates_suppressed",
            "Re-sent items answered from an earlier result instead of being run again.",
            ["source"],
            registry=r,
        )
        for source in ("memory", "store", "in_flight"):
            self.duplicates.labels(source)
        self.redeliveries = Counter(
            "fogline_cloud_redeliveries",
            "Messages the broker delivered again (MQTT dup flag).",
            registry=r,
        )
        self.acks_pending = Gauge(
            "fogline_cloud_acks_pending",
            "Messages received but not yet acknowledged (results not yet stored).",
            registry=r,
        )
        self.ready = Gauge("fogline_cloud_ready", "1 when the worker is ready.", registry=r)
        self.models = ModelMetrics(r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this worker's metrics."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent); handy for status pages and tests."""
        got = self.registry.get_sample_value(name, labels or {})
        return float(got) if got is not None else 0.0


# ---------------------------------------------------------------------------------------
# Per-model serving metrics (the model repository's schedulers feed them).

log = logging.getLogger("fogline.cloud.metrics")

_MODEL_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Requests may queue for seconds (bulk lane) or minutes; the fine buckets stay for p50/p99.
_REQUEST_BUCKETS_S = (*_LATENCY_BUCKETS_S, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
MODEL_OUTCOMES = ("ok", "bad_input", "queue_full", "deadline", "not_ready", "backend_error")


class _LaneStats:
    """Arrival rate (an exponentially decaying event rate, time constant ``window_s``) and
    the p99 of the last ``samples`` latencies of one model and lane.

    Hand-written because prometheus_client has no EWMA or sliding quantile; the gauges read
    these when scraped, so the rate decays to 0 while nothing arrives.
    """

    def __init__(self, clock: Callable[[], float], window_s: float, samples: int) -> None:
        self._clock = clock
        self._window_s = window_s
        self._lock = threading.Lock()
        self._rate = 0.0
        self._last_s: float | None = None
        self._latencies: deque[float] = deque(maxlen=samples)

    def arrived(self, n: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._rate = self._decayed(now) + n / self._window_s
            self._last_s = now

    def rate(self) -> float:
        with self._lock:
            return self._decayed(self._clock())

    def _decayed(self, now: float) -> float:
        if self._last_s is None:
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._last_s) / self._window_s)

    def answered(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def p99(self) -> float:
        with self._lock:
            values = sorted(self._latencies)
        if not values:
            return 0.0
        # Nearest-rank p99: the smallest value with at least 99 % of samples at or below it.
        return values[max(0, math.ceil(0.99 * len(values)) - 1)]


class ModelMetrics:
    """Metrics of the models a worker serves, per model, version and lane.

    ``fogline_model_requests_total{model,version,lane,outcome}`` (outcomes in
    :data:`MODEL_OUTCOMES`), ``fogline_model_queue_depth{model,lane}``,
    ``fogline_model_queue_seconds{model,lane}``, ``fogline_model_compute_seconds{model}``,
    ``fogline_model_batch_size{model}`` (rows per batch),
    ``fogline_model_request_seconds{model,lane}`` (arrival to answer),
    ``fogline_model_arrival_rate{model,lane}`` (requests/s, decaying over ~10 s),
    ``fogline_model_latency_p99_seconds{model,lane}`` (p99 of the last 1000 answers) and,
    where a CUDA device is visible and watched, ``fogline_gpu_memory_used_bytes{device}``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 10.0,
        latency_samples: int = 1000,
    ) -> None:
        r = registry
        self._clock = clock
        self._rate_window_s = rate_window_s
        self._latency_samples = latency_samples
        self._stats: dict[tuple[str, str], _LaneStats] = {}
        self._lock = threading.Lock()
        self.requests = Counter(
            "fogline_model_requests",
            "Inference requests by model, version, lane and outcome.",
            ["model", "version", "lane", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "fogline_model_queue_depth",
            "Requests waiting in a model's lane.",
            ["model", "lane"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "fogline_model_queue_seconds",
            "Time a request waited before its batch started.",
            ["model", "lane"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "fogline_model_compute_seconds",
            "Backend time per batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "fogline_model_batch_size",
            "Rows per batch run.",
            ["model"],
            buckets=_MODEL_BATCH_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "fogline_model_request_seconds",
            "Time from a request's arrival to its answer.",
            ["model", "lane"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.arrival_rate = Gauge(
            "fogline_model_arrival_rate",
            "Requests per second arriving, averaged over about 10 s.",
            ["model", "lane"],
            registry=r,
        )
        self.latency_p99 = Gauge(
            "fogline_model_latency_p99_seconds",
            "p99 of the last 1000 request latencies (arrival to answer).",
            ["model", "lane"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "fogline_gpu_memory_used_bytes",
            "Memory in use on a CUDA device.",
            ["device"],
            registry=r,
        )
        self._gpu_watched = False

    def lane(self, model: str, lane: str) -> _LaneStats:
        """The rate and p99 tracker of ``model`` and ``lane``, created (and its gauges
        bound) on first use."""
        key = (model, lane)
        stats = self._stats.get(key)
        if stats is not None:
            return stats
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = _LaneStats(self._clock, self._rate_window_s, self._latency_samples)
                self.arrival_rate.labels(model=model, lane=lane).set_function(stats.rate)
                self.latency_p99.labels(model=model, lane=lane).set_function(stats.p99)
                self._stats[key] = stats
        return stats

    def watch_gpu_memory(self) -> bool:
        """Report each visible CUDA device's used memory (through torch) when scraped.

        Returns False, and reports nothing, where torch or a CUDA device is missing.
        """
        if self._gpu_watched:
            return True
        if importlib.util.find_spec("torch") is None:
            return False
        try:
            import torch

            if not torch.cuda.is_available():
                return False
            count = int(torch.cuda.device_count())
        except (ImportError, OSError, RuntimeError):
            return False
        for index in range(count):
            self.gpu_memory_used.labels(device=f"cuda:{index}").set_function(
                _gpu_memory_reader(index)
            )
        self._gpu_watched = True
        return True


def _gpu_memory_reader(index: int) -> Callable[[], float]:
    def read() -> float:
        import torch

        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:
            log.debug("GPU memory of cuda:%d is unreadable", index, exc_info=True)
            return math.nan
        return float(total - free)

    return read
