"""Supervision of long-lived threads: what escapes a thread is logged, counted and acted on.

A thread that dies quietly leaves a process that still says it is ready while part of it
does nothing: its queue fills, its callers wait for ever. Every long-lived thread of the
agent and of the cloud worker therefore runs under a :class:`Supervisor`, which catches
whatever escapes the thread's function and does one of two things, chosen per thread
kind by its owner:

* **carry on** (``fatal=False``): for a loop whose one failed iteration leaves nothing
  behind that cannot be trusted. The failure is logged with its traceback and counted,
  and the function is entered again after a backoff that doubles with each failure in a
  row (from ``backoff_initial_s`` up to ``backoff_max_s``; a failure after ``calm_s``
  without one starts again from the bottom), so a permanent fault costs a log line every
  few seconds rather than a spinning core.
* **fatal** (``fatal=True``): for a thread whose state cannot be trusted after an escape.
  The failure is logged, counted and kept (:attr:`Supervisor.failed`); the owner's
  readiness turns false and the hooks given to :meth:`Supervisor.on_fatal` are called
  once, so that a service (``fogline agent run``, ``fogline cloud serve``) exits non-zero
  and its service manager starts it afresh from what is durable.

Failures contained elsewhere (a message whose handler raised, a batch that failed) are
counted with :meth:`Supervisor.count`; counts kept by another part (the MQTT connection's)
are added with :meth:`Supervisor.watch`. :meth:`Supervisor.counts` is what a package's
``thread_failures`` metric reports. An exception's notes (``add_note``: the message or
batch it was handling) are repeated in the log line, so a failure names its work where it
has one.

It lives in ``fogline.messaging`` because that is the one package both the agent and the
cloud worker import; it knows nothing of MQTT.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Supervisor", "ThreadFailure"]


@dataclass(frozen=True, slots=True)
class ThreadFailure:
    """A supervised thread that stopped for good: of which owner, which kind, and why."""

    owner: str
    kind: str
    error: BaseException

    @property
    def message(self) -> str:
        """One line for logs, ``/readyz`` and the command's ``error:`` line."""
        return f"the {self.kind} thread of {self.owner} failed: {_describe(self.error)}"

    def __str__(self) -> str:
        return self.message


class Supervisor:
    """The supervisor of one owner's threads (an agent, a worker, a model repository).

    ``owner`` names it in log lines (``agent for site-a``). Hooks given to :meth:`on_fatal`
    are called once, on the failing thread, when the first fatal failure happens. Thread-safe.
    """

    def __init__(
        self,
        owner: str,
        logger: logging.Logger,
        *,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        calm_s: float = 30.0,
        log_every_s: float = 10.0,
    ) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"backoff must satisfy 0 < initial ({backoff_initial_s}) <= max ({backoff_max_s})"
            )
        self.owner = owner
        self._log = logger
        self._initial_s = backoff_initial_s
        self._max_s = backoff_max_s
        self._calm_s = calm_s
        self._log_every_s = log_every_s
        self._logged_at: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._watched: dict[str, Callable[[], int]] = {}
        self._failed: ThreadFailure | None = None
        self._fatal_hooks: list[Callable[[ThreadFailure], None]] = []

    # what happened

    @property
    def failed(self) -> ThreadFailure | None:
        """The first fatal failure, or None while every fatal-kind thread is sound."""
        return self._failed

    def counts(self) -> dict[str, int]:
        """Failures by thread kind: those counted here plus the watched counts."""
        with self._lock:
            out = dict(self._counts)
            watched = list(self._watched.items())
        for kind, read in watched:
            out[kind] = out.get(kind, 0) + int(read())
        return out

    def count(self, kind: str, n: int = 1) -> None:
        """Count ``n`` failures of ``kind`` that were contained where they happened."""
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + n

    def contained(self, kind: str, what: str, error: BaseException) -> None:
        """Count and log a failure of ``kind`` that was contained where it happened:
        ``what`` names the work it failed on (``a batch of 3 inputs``, ``message 0f3a…``).
        At most one line per kind every ``log_every_s`` (the next says how many were held
        back), so a fault that strikes every message cannot flood the log."""
        self.count(kind)
        now = time.monotonic()
        with self._lock:
            last = self._logged_at.get(kind, -math.inf)
            if now - last < self._log_every_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._logged_at[kind] = now
            held = self._held.pop(kind, 0)
        self._log.error(
            "%s: the %s thread failed on %s: %s; that work is answered with the error and the "
            "thread carries on%s",
            self.owner,
            kind,
            what,
            _describe(error),
            f" ({held} similar failures since the last line)" if held else "",
            exc_info=False if isinstance(error, RecursionError) else error,
        )

    def watch(self, kind: str, read: Callable[[], int]) -> None:
        """Add a count another part keeps (read at each :meth:`counts`) to ``kind``."""
        with self._lock:
            self._watched[kind] = read

    def on_fatal(self, hook: Callable[[ThreadFailure], None]) -> None:
        """Also call ``hook(failure)`` on the first fatal failure (at once if it happened)."""
        with self._lock:
            failed = self._failed
            if failed is None:
                self._fatal_hooks.append(hook)
        if failed is not None:
            hook(failed)

    def fail(self, kind: str, error: BaseException) -> ThreadFailure:
        """Record a fatal failure of ``kind`` (the first one wins); the failure kept."""
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = ThreadFailure(self.owner, kind, error)
            failed = self._failed
            hooks = list(self._fatal_hooks) if first else []
        assert failed is not None
        if first:
            for hook in hooks:
                try:
                    hook(failed)
                except Exception:  # noqa: BLE001 - a hook's bug must not hide the failure
                    self._log.exception("%s: a failure hook raised", self.owner)
        return failed

    # threads

    def thread(
        self,
        kind: str,
        target: Callable[[], None],
        *,
        fatal: bool,
        name: str,
        halt: threading.Event | None = None,
    ) -> threading.Thread:
        """A daemon thread (not started) that runs ``target`` under this supervisor.

        ``target`` returning ends the thread. With ``fatal`` an escape ends it for good
        (see the module docstring); without, ``target`` is entered again after the
        backoff, unless ``halt`` is set meanwhile."""
        return threading.Thread(
            target=self.run, args=(kind, target, fatal, halt), name=name, daemon=True
        )

    def run(
        self,
        kind: str,
        target: Callable[[], None],
        fatal: bool,
        halt: threading.Event | None = None,
    ) -> None:
        """Run ``target`` under supervision in the calling thread (what :meth:`thread`
        runs)."""
        in_a_row = 0
        last_failure = -math.inf
        while True:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - nothing ends this thread unseen
                self.count(kind)
                notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
                # A RecursionError's traceback is thousands of frames: the line says enough.
                trace = False if isinstance(exc, RecursionError) else exc
                if fatal or not isinstance(exc, Exception):
                    self._log.critical(
                        "%s: the %s thread failed%s: %s; its work cannot go on, so the process "
                        "reports not ready and must be restarted",
                        self.owner,
                        kind,
                        notes,
                        _describe(exc),
                        exc_info=trace,
                    )
                    self.fail(kind, exc)
                    return
                now = time.monotonic()
                if now - last_failure > self._calm_s:
                    in_a_row = 0
                in_a_row += 1
                last_failure = now
                delay = min(self._max_s, self._initial_s * 2 ** min(in_a_row - 1, 30))
                self._log.error(
                    "%s: the %s thread failed%s: %s; carrying on in %.2g s (%d in a row)",
                    self.owner,
                    kind,
                    notes,
                    _describe(exc),
                    delay,
                    in_a_row,
                    exc_info=trace,
                )
                if halt is not None:
                    if halt.wait(delay):
                        return
                else:
                    time.sleep(delay)
            else:
                return


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
