"""What the updater does next, decided without I/O: the time is an argument.

:func:`next_action` compares what the site runs with what the repositories agreed on;
:class:`UpdateState` turns each attempt's outcome into the phase, staleness and error a
status report carries, and into the time of the next attempt (the poll period, a nudge at
once, or a backoff after a transport failure); :meth:`UpdateState.report_due` says when a
periodic report is due.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["Action", "BundleRef", "UpdateState", "next_action"]

Action = Literal["idle", "active", "install"]
Outcome = Literal["idle", "active", "installed", "expired", "transport", "refused", "aborted"]


@dataclass(frozen=True, slots=True)
class BundleRef:
    """A released bundle, as the updater compares them: ``name@version`` and the SHA-256
    of its manifest (the release's identity)."""

    id: str
    manifest_sha256: str


def next_action(running: BundleRef | None, desired: BundleRef | None) -> Action:
    """``idle`` when the director wants nothing of this site (it keeps what it runs),
    ``active`` when it runs the desired release, else ``install``."""
    if desired is None:
        return "idle"
    if running is not None and running == desired:
        return "active"
    return "install"


@dataclass
class UpdateState:
    """Where the site's update stands, and when to act next.

    ``poll_s``: the period between refreshes when nothing nudges; ``report_s``: between
    periodic reports. After a transport failure the next attempt comes after
    ``backoff_initial_s``, doubling with each failure in a row up to ``poll_s``.
    """

    poll_s: float
    report_s: float
    backoff_initial_s: float = 1.0
    phase: str = "idle"
    desired: str | None = None
    stale: bool = False
    error: str | None = None
    failures_in_a_row: int = 0
    next_attempt_at: float = 0.0
    next_report_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("poll_s", "report_s", "backoff_initial_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def snapshot(self) -> UpdateState:
        return dataclasses.replace(self)

    def nudge(self, now: float) -> None:
        """A hint that the director changed: refresh now (a backoff still holds)."""
        if self.failures_in_a_row == 0:
            self.next_attempt_at = min(self.next_attempt_at, now)

    def begin(self, desired: str) -> bool:
        """An install of ``desired`` starts (``downloading``); True: the phase changed."""
        return self._set(phase="downloading", desired=desired, error=None)

    def verified(self) -> bool:
        return self._set(phase="verified")

    def outcome(
        self, kind: Outcome, now: float, *, desired: str | None = None, error: str | None = None
    ) -> bool:
        """Record how an attempt ended; True when the phase (or staleness) changed, which
        is a reason to report at once.

        ``idle``/``active``/``installed``: fine, fresh metadata. ``expired``: the signed
        metadata expired — keep serving, stale, retry at the next poll. ``transport``:
        the repositories could not be reached — back off, keep the phase (``failed``
        when an install broke off). ``refused``: a
        verification refused what was offered, or the bundle did not load — ``failed``.
        ``aborted``: the director changed its mind while the site downloaded — look
        again at once.
        """
        if kind == "transport":
            self.failures_in_a_row += 1
            doubling = 2 ** min(self.failures_in_a_row - 1, 30)
            delay = min(self.poll_s, self.backoff_initial_s * doubling)
            self.next_attempt_at = now + delay
            if self.phase in ("downloading", "verified"):  # an install that broke off
                return self._set(phase="failed", error=error)
            return self._set(error=error)
        self.failures_in_a_row = 0
        if kind == "aborted":
            self.next_attempt_at = now
            return self._set(desired=desired)
        self.next_attempt_at = now + self.poll_s
        if kind == "expired":
            phase = "failed" if self.phase in ("downloading", "verified") else self.phase
            return self._set(phase=phase, stale=True, error=error)
        if kind == "refused":
            return self._set(phase="failed", desired=desired, stale=False, error=error)
        # Running what it was told (or told nothing): no bundle to work towards.
        phase = "idle" if kind == "idle" else "active"
        return self._set(phase=phase, desired=None, stale=False, error=None)

    def report_due(self, now: float) -> bool:
        return now >= self.next_report_at

    def reported(self, now: float) -> None:
        self.next_report_at = now + self.report_s

    def wait_s(self, now: float) -> float:
        """Seconds until the next attempt or report, whichever comes first."""
        return max(0.0, min(self.next_attempt_at, self.next_report_at) - now)

    def _set(self, **changes: object) -> bool:
        before = (self.phase, self.stale)
        for name, value in changes.items():
            setattr(self, name, value)
        return (self.phase, self.stale) != before
