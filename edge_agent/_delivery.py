"""The agent's delivery protocol as pure logic: what is pending, when each item is sent
again, how long its caller waits, and what the caller gets when the cloud stays silent.

No threads, no I/O, no clock of its own, no paho and no SQLite: every method that
depends on time takes ``now`` (monotonic seconds) and returns what to do — the payloads
to publish, the items due for a re-send, the callers whose wait is over. The agent's
threads are thin loops over one :class:`DeliveryCore`:

* the journal thread, once new items are on disk, :meth:`~DeliveryCore.admit`\\ s them:
  which to publish now, whose caller may wait for the cloud (breaker), who is answered
  at once (not connected, breaker open);
* paho's network thread hands it every result (:meth:`~DeliveryCore.on_result`): an
  answer ends the item, ``busy`` backs it off (``retry_after_ms``), anything for an id
  that is not pending is a duplicate;
* the resend thread asks what is due (:meth:`~DeliveryCore.due`): exponential backoff
  with jitter, capped by ``retry_max``, the whole drained at ``resend_rate_per_s``;
* the deadline thread asks whose wait is over (:meth:`~DeliveryCore.expire_waits`); each
  such caller counts as a timeout for the :class:`~._breaker.CircuitBreaker`, and gets
  the edge's own answer where :meth:`~DeliveryCore.degrades` says so.

The caller's handle (the agent's ``Future``) is opaque here (``W``). One lock guards the
state, since four threads call in; it is held for the bookkeeping only. Jitter comes from
an injected random source, so tests with a fake clock see exact schedules.
"""

from __future__ import annotations

import collections
import heapq
import random
import threading
from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, Protocol, TypeVar

from fogline.compression import ResultStatus
from fogline.edge_agent._breaker import CircuitBreaker

__all__ = [
    "Admission",
    "DeliveryCore",
    "DeliveryPolicy",
    "Pending",
    "ResultAction",
    "Uniform",
]

W = TypeVar("W")
# 2**60 times any sane retry_initial is far past retry_max; a larger exponent would only
# risk an OverflowError on an item re-sent for a very long time.
_MAX_DOUBLINGS = 60


class Uniform(Protocol):
    """A random source: ``random.Random`` or a test's stand-in."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """The delivery settings, in seconds.

    ``timeout_s``: how long a caller waits for the cloud; ``retry_initial_s`` /
    ``retry_max_s``: the first re-send delay and its cap (it doubles per attempt);
    ``resend_rate_per_s``: at most this many re-sends per second, with a burst of a fifth
    of a second's worth; ``degrade``: a caller who stops waiting gets the edge's own answer
    when there is one (else an error); ``jitter``: each delay is drawn from
    ``delay × [1 − jitter, 1 + jitter]`` (``busy`` back-offs from
    ``[1, 1 + 2 × jitter]``: never earlier than the cloud asked).
    """

    timeout_s: float
    retry_initial_s: float
    retry_max_s: float
    resend_rate_per_s: float
    degrade: bool
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("timeout_s", "retry_initial_s", "retry_max_s", "resend_rate_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) is below retry_initial_s "
                f"({self.retry_initial_s})"
            )
        if not isinstance(self.degrade, bool):
            raise TypeError(f"degrade must be a bool, got {self.degrade!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")


class Pending(Generic[W]):
    """A forwarded item in the outbox, waiting for its answer.

    ``waiter`` is the caller still waiting (None once nobody waits: its outcome then goes
    to ``on_answer``); ``arrived`` is the agent's own latency clock, opaque here; ``rel``,
    ``conf`` and ``label`` are the edge's decision inputs and its own answer (for a
    degraded reply); ``attempts`` counts sends so far (0: not sent yet); ``busy`` says
    the cloud refused it as busy at least once; ``recovered`` that it was found in the
    outbox at start-up; ``bundle`` names the bundle that decided it (None when
    recovered), so its answer names that bundle even after a swap. Changed by
    :class:`DeliveryCore` only, under its lock, once admitted.
    """

    __slots__ = (
        "arrived",
        "attempts",
        "bundle",
        "busy",
        "conf",
        "label",
        "next_at",
        "recovered",
        "rel",
        "tag",
        "waiter",
    )

    def __init__(
        self,
        waiter: W | None,
        arrived: float,
        rel: float | None = None,
        conf: float | None = None,
        label: int | None = None,
        tag: str | None = None,
        *,
        recovered: bool = False,
        bundle: str | None = None,
    ) -> None:
        self.waiter = waiter
        self.bundle = bundle
        self.arrived = arrived
        self.rel = rel
        self.conf = conf
        self.label = label
        self.tag = tag
        self.next_at = 0.0
        self.attempts = 1
        self.busy = False
        self.recovered = recovered


class Admission(NamedTuple, Generic[W]):
    """What to do with newly stored items: ``send`` these payloads now; answer each of
    ``unserved`` at once (``why``: nobody may wait for the cloud)."""

    send: list[bytes]
    unserved: list[tuple[bytes, Pending[W], W]]
    why: str


class ResultAction(NamedTuple, Generic[W]):
    """What a result means. ``kind``: ``unknown`` (no such item is pending: answered
    already, evicted, or never ours — a duplicate), ``busy`` (backed off, still pending),
    ``final`` (the item is done: hand its outcome to ``waiter``, or to ``on_answer`` when
    that is None, then delete it from the outbox)."""

    kind: Literal["unknown", "busy", "final"]
    pending: Pending[W] | None
    waiter: W | None


class DeliveryCore(Generic[W]):
    """Pending items, their re-send schedule and their callers' deadlines.

    Thread-safe. ``now`` is always the monotonic clock in seconds."""

    def __init__(
        self,
        policy: DeliveryPolicy,
        breaker: CircuitBreaker,
        rng: Uniform | None = None,
    ) -> None:
        if not isinstance(policy, DeliveryPolicy):
            raise TypeError("DeliveryCore needs a DeliveryPolicy")
        if not isinstance(breaker, CircuitBreaker):
            raise TypeError("DeliveryCore needs a CircuitBreaker")
        self.policy = policy
        self.breaker = breaker
        self._rng: Uniform = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._pending: dict[bytes, Pending[W]] = {}
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0
        # (deadline, message ids) of callers waiting for the cloud. Tuples of atoms, which
        # the garbage collector stops tracking: at cloud_timeout_ms of traffic they are
        # many, and every full collection would walk them all.
        self._deadlines: collections.deque[tuple[float, tuple[bytes, ...]]] = collections.deque()
        # Items in the journal's hands: new ones not yet admitted, answered ones not yet
        # deleted. drained() is false while there are any.
        self._journaling = 0
        self._budget = 0.0
        self._last: float | None = None

    # reading

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._pending

    def get(self, message_id: bytes) -> Pending[W] | None:
        return self._pending.get(message_id)

    def drained(self) -> bool:
        """True when nothing is pending and the journal holds nothing of ours."""
        with self._lock:
            return not self._pending and not self._journaling

    def degrades(self, p: Pending[W]) -> bool:
        """Does a caller who stops waiting get the edge's own answer (``degraded``)? Only
        with ``degrade`` set and when the edge had an answer (an early-exit head)."""
        return self.policy.degrade and p.label is not None

    # the journal

    def journal_started(self, n: int) -> None:
        """``n`` new items went to the journal, to be admitted once stored."""
        with self._lock:
            self._journaling += n

    def journal_done(self, n: int) -> None:
        """The journal is done with ``n`` items (stored or refused, or deleted)."""
        with self._lock:
            self._journaling -= n

    def recover(self, items: Iterable[tuple[bytes, str | None, float]], now: float) -> int:
        """Register ``(message_id, tag, arrived)`` items found in the outbox at start-up,
        oldest first; their first sends are spread over the re-send rate. Sent by an
        earlier run (most likely), so each send is a re-send. Returns how many."""
        rate = self.policy.resend_rate_per_s
        n = 0
        with self._lock:
            for k, (mid, tag, arrived) in enumerate(items):
                p: Pending[W] = Pending(None, arrived, tag=tag, recovered=True)
                p.next_at = now + k / rate
                self._pending[mid] = p
                self._schedule(mid, p.next_at)
                n += 1
        return n

    def admit(
        self,
        items: Iterable[tuple[bytes, bytes, Pending[W], W]],
        gone: Set[bytes],
        now: float,
        *,
        connected: bool,
    ) -> Admission[W]:
        """Register ``(message_id, payload, pending, caller)`` items that are now on disk.

        Each caller waits for the cloud while connected and the breaker lets it (one probe
        at a time when ``half_open``); the others are ``unserved``, to be answered at once.
        Items in ``gone`` were evicted as they were stored: they keep their caller, for
        :meth:`evict` to hand over, and are not sent. The first re-send is due after
        ``retry_initial``; unconnected, everything is due at once (sent on reconnect, as a
        first send)."""
        pol = self.policy
        j = pol.jitter
        first_retry = now + pol.retry_initial_s * self._rng.uniform(1 - j, 1 + j)
        breaker = self.breaker
        send: list[bytes] = []
        unserved: list[tuple[bytes, Pending[W], W]] = []
        waiting: list[bytes] = []
        with self._lock:
            for mid, payload, p, caller in items:
                doomed = mid in gone
                wait = (
                    not doomed
                    and connected
                    and (breaker.state == "closed" or breaker.allow_wait(now))
                )
                if wait or doomed:
                    p.waiter = caller
                else:
                    p.waiter = None
                    unserved.append((mid, p, caller))
                if connected:
                    p.next_at = first_retry
                else:
                    p.next_at = now
                    p.attempts = 0  # its first send waits for the connection
                self._pending[mid] = p
                self._schedule(mid, p.next_at)
                if wait:
                    waiting.append(mid)
                if connected and not doomed:
                    send.append(payload)
            if waiting:
                self._deadlines.append((now + pol.timeout_s, tuple(waiting)))
        why = "not connected to the broker" if not connected else "circuit breaker open"
        return Admission(send, unserved, why)

    def evict(self, message_ids: Iterable[bytes]) -> list[tuple[bytes, Pending[W], W | None]]:
        """Take items a bound pushed out of the outbox; each with its waiting caller."""
        return self.take(message_ids)

    def take(self, message_ids: Iterable[bytes]) -> list[tuple[bytes, Pending[W], W | None]]:
        """Take items that end without an answer (evicted, quarantined): each pending one,
        with its waiting caller, for its one outcome; no re-send follows."""
        out: list[tuple[bytes, Pending[W], W | None]] = []
        with self._lock:
            for mid in message_ids:
                p = self._pending.pop(mid, None)
                if p is not None:
                    caller, p.waiter = p.waiter, None
                    out.append((mid, p, caller))
        return out

    def abandon(self, message_ids: Iterable[bytes]) -> None:
        """Forget items that ended otherwise (a journal fault); no outcome follows."""
        with self._lock:
            for mid in message_ids:
                self._pending.pop(mid, None)

    def take_waiters(self) -> list[W]:
        """Every caller still waiting, each taken off its item (the agent is stopping)."""
        out: list[W] = []
        with self._lock:
            for p in self._pending.values():
                if p.waiter is not None:
                    out.append(p.waiter)
                    p.waiter = None
        return out

    # results

    def on_result(
        self,
        message_id: bytes,
        status: ResultStatus | None,
        now: float,
        *,
        retry_after_ms: int | None = None,
    ) -> ResultAction[W]:
        """A result arrived for ``message_id``; ``status`` None means it was malformed
        (the item ends: the cloud answered, badly).

        Any result of a pending item is a sign of life: the breaker closes. ``busy`` keeps
        the item and moves its next send to ``retry_after_ms`` (``retry_initial`` when
        absent or 0) with upward jitter. Anything else ends it: it leaves the pending set
        (a second result for it is ``unknown``) and its delete goes to the journal."""
        with self._lock:
            p = self._pending.get(message_id)
            if p is None:
                return ResultAction("unknown", None, None)
            self.breaker.record_success()
            if status is ResultStatus.BUSY:
                pol = self.policy
                retry_s = retry_after_ms / 1000.0 if retry_after_ms else pol.retry_initial_s
                p.busy = True
                p.next_at = now + retry_s * self._rng.uniform(1, 1 + 2 * pol.jitter)
                self._schedule(message_id, p.next_at)
                return ResultAction("busy", p, None)
            del self._pending[message_id]
            caller, p.waiter = p.waiter, None
            self._journaling += 1  # its delete follows
        return ResultAction("final", p, caller)

    # time

    def due(self, now: float, *, connected: bool) -> list[tuple[bytes, bool]]:
        """The items to send now, as ``(message_id, is_resend)``, within the rate limit.

        The budget grows by ``resend_rate_per_s`` per second (up to a fifth of a second's
        worth, at least one) whether or not connected; unconnected, nothing is due. Each
        item taken is rescheduled at once: ``retry_initial × 2^(attempts − 1)``, capped
        at ``retry_max``, jittered, so an item whose send is lost is sent again."""
        pol = self.policy
        rate = pol.resend_rate_per_s
        with self._lock:
            last = now if self._last is None else self._last
            self._last = now
            budget = min(self._budget + max(0.0, now - last) * rate, max(1.0, rate / 5))
            out: list[tuple[bytes, bool]] = []
            if connected and budget >= 1.0:
                limit = int(budget)
                heap = self._heap
                j = pol.jitter
                while heap and heap[0][0] <= now and len(out) < limit:
                    at, _seq, mid = heapq.heappop(heap)
                    p = self._pending.get(mid)
                    if p is None or p.next_at != at:
                        continue  # answered, evicted or rescheduled meanwhile
                    again = p.attempts > 0
                    p.attempts += 1
                    doublings = min(max(0, p.attempts - 1), _MAX_DOUBLINGS)
                    backoff = min(pol.retry_initial_s * 2**doublings, pol.retry_max_s)
                    p.next_at = now + backoff * self._rng.uniform(1 - j, 1 + j)
                    self._schedule(mid, p.next_at)
                    out.append((mid, again))
                budget -= len(out)
            self._budget = budget
        return out

    def next_due(self) -> float | None:
        """When the earliest scheduled send is due (it may be stale), or None."""
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def expire_waits(self, now: float) -> list[tuple[bytes, Pending[W], W]]:
        """Callers who have waited ``timeout_s``: each is taken off its item (which stays
        pending, its outcome now for ``on_answer``) and counts as a breaker timeout. The
        caller then gets the edge's answer where :meth:`degrades`, else a timeout error
        (a busy error when the cloud said busy)."""
        expired: list[tuple[bytes, Pending[W], W]] = []
        dq = self._deadlines
        with self._lock:
            while dq and dq[0][0] <= now:
                _deadline, mids = dq.popleft()
                for mid in mids:
                    p = self._pending.get(mid)
                    if p is not None and p.waiter is not None:
                        expired.append((mid, p, p.waiter))
                        p.waiter = None
        for _ in expired:
            self.breaker.record_timeout(now)
        return expired

    # internals (lock held)

    def _schedule(self, mid: bytes, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, mid))
