"""A circuit breaker for the agent's interactive calls to the cloud. Pure: callers pass
the time in.

``closed``: callers wait for the cloud. After ``failure_threshold`` consecutive timeouts
the breaker opens: callers stop waiting and get the edge's own answer (marked degraded)
or a fast failure, while forwarded items keep flowing through the outbox. After
``open_s`` it turns ``half_open`` and lets one caller wait as a probe; any answer from
the cloud (a probe's or a re-sent item's) closes it, a probe's timeout opens it again for
twice as long, up to ``max_open_s``.
"""

from __future__ import annotations

import threading
from typing import Literal

__all__ = ["CircuitBreaker", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]
STATE_CODES: dict[CircuitState, int] = {"closed": 0, "open": 1, "half_open": 2}


class CircuitBreaker:
    """Thread-safe; every method takes ``now_s`` from a monotonic clock."""

    def __init__(
        self, *, failure_threshold: int = 5, open_s: float = 5.0, max_open_s: float = 60.0
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if not 0 < open_s <= max_open_s:
            raise ValueError(f"need 0 < open_s <= max_open_s, got {open_s} and {max_open_s}")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.max_open_s = max_open_s
        self._lock = threading.Lock()
        self._state: CircuitState = "closed"
        self._failures = 0
        self._until = 0.0
        self._current_open_s = open_s
        self._probe_out = False
        self.transitions = 0

    @property
    def state(self) -> CircuitState:
        return self._state

    def allow_wait(self, now_s: float) -> bool:
        """May a caller wait for the cloud now? In ``half_open`` only one probe at a time."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if now_s < self._until:
                    return False
                self._set("half_open")
            if self._probe_out:
                return False
            self._probe_out = True
            return True

    def record_success(self) -> None:
        """The cloud answered something: close."""
        with self._lock:
            self._failures = 0
            self._probe_out = False
            self._current_open_s = self.open_s
            if self._state != "closed":
                self._set("closed")

    def record_timeout(self, now_s: float) -> None:
        """A caller gave up waiting for the cloud."""
        with self._lock:
            self._failures += 1
            if self._state == "half_open":
                self._probe_out = False
                self._current_open_s = min(self._current_open_s * 2, self.max_open_s)
                self._open(now_s)
            elif self._state == "closed" and self._failures >= self.failure_threshold:
                self._open(now_s)

    def force_open(self, now_s: float) -> None:
        """Open at once (the broker connection is gone: waiting cannot succeed)."""
        with self._lock:
            if self._state != "open":
                self._open(now_s)

    def _open(self, now_s: float) -> None:
        self._until = now_s + self._current_open_s
        self._set("open")

    def _set(self, state: CircuitState) -> None:
        if state != self._state:
            self._state = state
            self.transitions += 1
