"""Prometheus metrics of one agent, in the agent's own registry.

Each agent owns a :class:`~prometheus_client.CollectorRegistry` rather than the global
one: the one-box demo runs three agents in one process, and each must report its own
figures. Counters are bumped once per batch, not once per item.

The latency histogram is a small custom collector because prometheus-client's
``Histogram`` observes one value at a time under a lock; a batch of items answered at the
same instant is recorded with one bucket update.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fogline.messaging import ThreadFailures

__all__ = ["SOURCES", "THREAD_KINDS", "AgentMetrics", "BatchHistogram", "ThreadFailures"]

SOURCES = ("dropped", "edge", "cloud")
#: The agent's long-lived threads, as ``fogline_agent_thread_failures_total`` labels them.
THREAD_KINDS = ("model", "journal", "resend", "deadlines", "mqtt", "mqtt_handler", "http", "sync")
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class BatchHistogram(Collector):
    """A labelled histogram that can record ``count`` observations of one value at once."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: Sequence[str],
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._label = label
        self._bounds = [*sorted(buckets), math.inf]
        self._counts = {v: [0] * len(self._bounds) for v in values}
        self._sums = dict.fromkeys(values, 0.0)
        self._lock = threading.Lock()
        #: Also told of every observation (the agent's health window), when set.
        self.tap: Callable[[str, float, int], None] | None = None

    def observe(self, value: str, seconds: float, count: int = 1) -> None:
        """Record ``count`` observations of ``seconds`` under label ``value``."""
        if count <= 0:
            return
        tap = self.tap
        if tap is not None:
            tap(value, seconds, count)
        idx = bisect.bisect_left(self._bounds, seconds)
        with self._lock:
            if value not in self._counts:
                self._counts[value] = [0] * len(self._bounds)
                self._sums[value] = 0.0
            self._counts[value][min(idx, len(self._bounds) - 1)] += count
            self._sums[value] += seconds * count

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        with self._lock:
            snapshot = {k: (list(c), self._sums[k]) for k, c in self._counts.items()}
        for value, (counts, total) in snapshot.items():
            cumulative, buckets = 0, []
            for bound, n in zip(self._bounds, counts, strict=True):
                cumulative += n
                buckets.append((_le(bound), float(cumulative)))
            family.add_metric([value], buckets, sum_value=total)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=[self._label])

    def count(self, value: str) -> int:
        with self._lock:
            return sum(self._counts.get(value, ()))


class AgentMetrics:
    """Every metric of one agent; ``registry`` is what ``GET /metrics`` exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.inputs = Counter("fogline_agent_inputs", "Inputs received.", registry=r)
        self.decisions = Counter(
            "fogline_agent_decisions",
            "Edge decisions: drop (filtered out), exit (answered at the edge), forward.",
            ["kind"],
            registry=r,
        )
        self.drop = self.decisions.labels(kind="drop")
        self.exit = self.decisions.labels(kind="exit")
        self.forward = self.decisions.labels(kind="forward")
        self.bytes_sent = Counter(
            "fogline_agent_bytes_sent", "Bytes of feature envelopes published.", registry=r
        )
        self.bytes_raw = Counter(
            "fogline_agent_bytes_raw", "Bytes of the raw inputs received.", registry=r
        )
        self.cloud_results = Counter(
            "fogline_agent_cloud_results",
            "Cloud results matched to a pending item, by status.",
            ["status"],
            registry=r,
        )
        for status in ("ok", "busy", "error"):
            self.cloud_results.labels(status=status)
        self.timeouts = Counter(
            "fogline_agent_cloud_timeouts",
            "Forwarded items that got no cloud answer in time.",
            registry=r,
        )
        self.rejected = Counter(
            "fogline_agent_rejected",
            "Messages on the result topic that were refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.shed = Counter(
            "fogline_agent_shed",
            "Inputs refused because too many were queued for the model.",
            registry=r,
        )
        self.pending = Gauge(
            "fogline_agent_pending", "Forwarded items waiting for the cloud.", registry=r
        )
        self.outbox_items = Gauge(
            "fogline_agent_outbox_items", "Items in the durable outbox.", registry=r
        )
        self.outbox_bytes = Gauge(
            "fogline_agent_outbox_bytes", "Payload bytes in the durable outbox.", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "fogline_agent_outbox_oldest_age_seconds",
            "Age of the oldest item in the outbox (0 when empty).",
            registry=r,
        )
        self.resends = Counter("fogline_agent_resends", "Outbox items published again.", registry=r)
        self.evictions = Counter(
            "fogline_agent_outbox_evictions",
            "Items evicted from the outbox unanswered, by bound.",
            ["reason"],
            registry=r,
        )
        for reason in ("max_items", "max_bytes", "max_age"):
            self.evictions.labels(reason=reason)
        self.quarantined = Counter(
            "fogline_agent_outbox_quarantined",
            "Damaged outbox rows moved to the quarantine table, never sent, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ("bad_row", "bad_envelope", "wrong_item"):
            self.quarantined.labels(reason=reason)
        self.circuit_state = Gauge(
            "fogline_agent_circuit_state",
            "Circuit breaker towards the cloud: 0 closed, 1 open, 2 half-open.",
            registry=r,
        )
        self.duplicates = Counter(
            "fogline_agent_duplicates_suppressed",
            "Cloud answers for items already answered; not delivered again.",
            registry=r,
        )
        self.degraded = Counter(
            "fogline_agent_degraded_answers",
            "Forwarded items answered by the edge alone (cloud late or unreachable).",
            registry=r,
        )
        self.detached = Counter(
            "fogline_agent_detached_outcomes",
            "Final outcomes of items no caller waited for any more, handed to on_answer.",
            ["kind"],
            registry=r,
        )
        self.ready = Gauge(
            "fogline_agent_ready", "1 when the model is warm and MQTT is connected.", registry=r
        )
        self.info = Info("fogline_agent", "Site and bundle of this agent.", registry=r)
        self.thread_failures = ThreadFailures(
            "fogline_agent_thread_failures",
            "Failures that escaped the work of a long-lived thread, by thread kind (logged; "
            "the thread carried on, or the agent reported not ready for good).",
            THREAD_KINDS,
        )
        r.register(self.thread_failures)
        self.latency = BatchHistogram(
            "fogline_agent_latency_seconds",
            "Time from an input's arrival to its answer, by where it was answered.",
            "source",
            SOURCES,
        )
        r.register(self.latency)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (0 when absent)."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got

    def total(self, name: str) -> float:
        """Sum of a sample over all its label values."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name:
                    total += sample.value
        return total
