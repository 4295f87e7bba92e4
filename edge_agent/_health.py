"""How the site fares since its last status report: answers, failures, latency, and how
often the cloud agreed with the edge. Pure: the caller passes the time.

Fed from what the agent measures anyway: every answer's latency is observed once (the
latency histogram hands it on here), failures are counters the agent keeps, and for each
forwarded item the agent knows the edge's own early-exit label and receives the cloud's.

Latency percentiles come from log-spaced buckets (each 5 % wider than the last, from
10 µs to about 10 min): bounded memory whatever the rate, and a percentile within 5 % of
the true value. A reservoir of raw samples would cost memory or accuracy under load.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

__all__ = ["HealthWindow"]

_RATIO = 1.05
_LOG_RATIO = math.log(_RATIO)
_MIN_S = 1e-5
_BUCKETS = int(math.log(600.0 / _MIN_S) / _LOG_RATIO) + 2


def _bucket(seconds: float) -> int:
    if not seconds > _MIN_S:  # also NaN
        return 0
    return min(_BUCKETS - 1, 1 + int(math.log(seconds / _MIN_S) / _LOG_RATIO))


def _upper_ms(index: int) -> float:
    """The upper bound of a bucket, in milliseconds."""
    return _MIN_S * _RATIO**index * 1000.0


class HealthWindow:
    """Counts since the last :meth:`take`. Thread-safe: answers are observed on the
    agent's threads, the updater takes the window on its own.

    ``failures()`` reads a running total of failed inputs (cloud errors, timeouts,
    inputs shed, batches the model failed), 0 when the window is made; each window
    reports its growth.
    """

    def __init__(self, now: float, failures: Callable[[], float] = lambda: 0.0) -> None:
        self._failures = failures
        self._lock = threading.Lock()
        self._counts = [0] * _BUCKETS
        self._answered = 0
        self._compared = 0
        self._agreed = 0
        self._since = now
        self._failed_at_start = 0.0

    def observe(self, source: str, seconds: float, count: int = 1) -> None:
        """``count`` answers of one latency (the latency histogram's shape)."""
        if count <= 0:
            return
        i = _bucket(seconds)
        with self._lock:
            self._counts[i] += count
            self._answered += count

    def compare(self, edge_label: int | None, cloud_label: int | None) -> None:
        """The cloud answered a forwarded item the edge had its own label for."""
        if edge_label is None or cloud_label is None:
            return
        with self._lock:
            self._compared += 1
            self._agreed += int(edge_label == cloud_label)

    def take(self, now: float) -> dict[str, float]:
        """The health of the window that ends ``now``, and a fresh window from there.

        ``items`` answers; ``items_per_s``; ``error_rate`` failed over answered (0 with
        none answered); ``latency_p50_ms``, ``latency_p99_ms`` (0 with none);
        ``agreement_rate`` the share of compared forwarded items where the cloud's label
        equalled the edge's (1 with none compared: nothing disagreed); ``compared``.
        """
        failed_total = self._failures()
        with self._lock:
            counts, self._counts = self._counts, [0] * _BUCKETS
            answered, self._answered = self._answered, 0
            compared, self._compared = self._compared, 0
            agreed, self._agreed = self._agreed, 0
            since, self._since = self._since, now
            failed = max(0.0, failed_total - self._failed_at_start)
            self._failed_at_start = failed_total
        span = now - since
        return {
            "items": float(answered),
            "items_per_s": answered / span if span > 0 else 0.0,
            "failed": failed,
            "error_rate": failed / answered if answered else (1.0 if failed else 0.0),
            "latency_p50_ms": _percentile(counts, answered, 0.50),
            "latency_p99_ms": _percentile(counts, answered, 0.99),
            "agreement_rate": agreed / compared if compared else 1.0,
            "compared": float(compared),
        }


def _percentile(counts: list[int], total: int, q: float) -> float:
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return _upper_ms(i)
    return _upper_ms(len(counts) - 1)
