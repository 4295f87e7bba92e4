"""Dynamic batching per model, with lanes that share the model fairly.

:class:`LaneScheduler` is the whole policy. It does no I/O and reads no clock: callers pass
the time in, so tests drive it with a fake clock. :class:`LaneBatcher` is the thin threaded
adapter: one consumer thread per model version that sleeps until the next batch or deadline
is due and hands batches and rejections to callbacks.

Batches. Each lane (:class:`~fogline.cloud_service._serving.Lane`) has its own FIFO queue,
bounded at its ``max_queue_items`` requests; a full lane refuses with
:class:`QueueFullError`. A request may carry several rows (its first axis); a batch is a
FIFO prefix of one lane's queue holding at most ``max_batch_size`` rows, all of the same
*group* (requests whose non-batch shapes differ cannot be concatenated). A lane has a batch
ready when

* ``max_batch_size`` rows are waiting, or
* at least the smallest of ``preferred_batch_sizes`` rows are waiting (the batch then takes
  the largest preferred size reachable, as Triton does), or
* its oldest request has waited ``max_queue_delay_ms`` (0: at once).

Deadlines. Every request carries a deadline (its own timeout, or its lane's
``timeout_ms``). One whose deadline passes while it waits is handed back as expired and
rejected with :class:`DeadlineExceededError`: it is never served late. The deadline bounds
the wait before the batch starts, not the compute time.

Fairness between lanes: smooth weighted round robin over *batch slots*. Each time a batch
is formed, every lane with a ready batch earns its weight in credit (defaults 8, 3, 1 for
interactive, stream, bulk); the lane with the most credit (ties: the higher-priority lane)
forms the batch and pays back the total weight of the lanes that competed. While all three
are busy, batches go 8:3:1 in a smooth interleave; a lone lane takes every slot; a busy
interactive lane cannot keep the bulk lane out for more than eight batches in a row, so
nothing starves. A lane forfeits its credit when its queue empties, so an idle lane cannot
save up a burst. Plain strict priority was rejected because a steady interactive load
would starve the bulk lane forever.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fogline.cloud_service._config import LaneConfigs, ModelConfig
from fogline.cloud_service._serving import Lane
from fogline.cloud_service.errors import QueueFullError
from fogline.messaging import Supervisor

__all__ = [
    "LANES",
    "LaneBatch",
    "LaneBatcher",
    "LaneScheduler",
    "Poll",
    "Queued",
    "SchedulerPolicy",
]

log = logging.getLogger("fogline.cloud.scheduler")

T = TypeVar("T")

#: The lanes, highest priority first (the tie-break order).
LANES: tuple[Lane, ...] = (Lane.INTERACTIVE, Lane.STREAM, Lane.BULK)


@dataclass(frozen=True)
class SchedulerPolicy:
    """Batch bounds, preferred sizes and lane limits of one model version.

    ``max_batch_size`` is in rows and at least 1 (a model that does not batch runs with 1
    and one row per request).
    """

    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    lanes: LaneConfigs = field(default_factory=LaneConfigs)
    retry_after_ms: int = 100

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0 or not math.isfinite(self.max_queue_delay_ms):
            raise ValueError(
                f"max_queue_delay_ms must be finite and >= 0, got {self.max_queue_delay_ms}"
            )
        sizes = tuple(sorted(set(self.preferred_batch_sizes)))
        if any(not 1 <= s <= self.max_batch_size for s in sizes):
            raise ValueError(
                f"preferred_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size}), "
                f"got {list(self.preferred_batch_sizes)}"
            )
        object.__setattr__(self, "preferred_batch_sizes", sizes)
        if self.retry_after_ms < 1:
            raise ValueError(f"retry_after_ms must be at least 1, got {self.retry_after_ms}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @classmethod
    def from_model_config(cls, config: ModelConfig, max_batch_size: int) -> SchedulerPolicy:
        """The policy of a model whose resolved ``max_batch_size`` is given (0: no batching,
        which schedules one request at a time)."""
        return cls(
            max_batch_size=max(1, max_batch_size),
            max_queue_delay_ms=config.max_queue_delay_ms,
            preferred_batch_sizes=config.preferred_batch_sizes if max_batch_size > 0 else (),
            lanes=config.lanes,
            retry_after_ms=config.busy_retry_after_ms,
        )


@dataclass(eq=False)
class Queued(Generic[T]):
    """One waiting request: the caller's item and what the scheduler knows about it.

    ``formed_before`` is how many batches had been formed when it was queued, so
    ``batch.index - formed_before`` counts the batches that went ahead of it.
    """

    item: T
    lane: Lane
    rows: int
    group: Hashable
    enqueued_s: float
    deadline_s: float
    formed_before: int
    waiting: bool = True  # False once taken into a batch or expired


@dataclass(frozen=True)
class LaneBatch(Generic[T]):
    """Requests of one lane that run together, oldest first. ``index`` numbers the batches
    a scheduler formed, from 0."""

    lane: Lane
    entries: tuple[Queued[T], ...]
    formed_s: float
    index: int

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)

    @property
    def items(self) -> tuple[T, ...]:
        return tuple(e.item for e in self.entries)


@dataclass(frozen=True)
class Poll(Generic[T]):
    """What is due at a moment: requests whose deadline passed, and at most one batch."""

    expired: tuple[Queued[T], ...] = ()
    batch: LaneBatch[T] | None = None


class _LaneQueue(Generic[T]):
    """A lane's FIFO. Expired entries are dropped lazily (flagged, skipped when reached)."""

    def __init__(self) -> None:
        self.entries: deque[Queued[T]] = deque()
        self.count = 0
        self.rows = 0
        self.credit = 0

    def head(self) -> Queued[T] | None:
        while self.entries and not self.entries[0].waiting:
            self.entries.popleft()
        return self.entries[0] if self.entries else None


class LaneScheduler(Generic[T]):
    """Per-lane queues, batch formation and lane sharing (see the module docstring).

    Not thread-safe: :class:`LaneBatcher` serialises access.
    """

    def __init__(self, policy: SchedulerPolicy) -> None:
        self.policy = policy
        self._lanes: dict[Lane, _LaneQueue[T]] = {lane: _LaneQueue() for lane in LANES}
        # (deadline, tiebreak, entry); entries that left are skipped when they surface.
        self._deadlines: list[tuple[float, int, Queued[T]]] = []
        self._tiebreak = 0
        self._formed = 0

    def __len__(self) -> int:
        """Requests waiting, over all lanes."""
        return sum(q.count for q in self._lanes.values())

    def depth(self, lane: Lane) -> int:
        """Requests waiting in ``lane``."""
        return self._lanes[lane].count

    def rows(self, lane: Lane) -> int:
        """Rows waiting in ``lane``."""
        return self._lanes[lane].rows

    @property
    def batches_formed(self) -> int:
        return self._formed

    def add(
        self,
        lane: Lane,
        item: T,
        now_s: float,
        *,
        rows: int = 1,
        timeout_ms: float | None = None,
        group: Hashable = None,
    ) -> Queued[T]:
        """Queue ``item`` in ``lane`` at ``now_s``; ``timeout_ms`` (default: the lane's)
        bounds its wait.

        Raises :class:`QueueFullError` when the lane holds ``max_queue_items`` requests, and
        ``ValueError`` for rows outside 1..max_batch_size or a non-positive timeout.
        """
        lane = Lane(lane)
        limits = self.policy.lanes[lane]
        if not 1 <= rows <= self.policy.max_batch_size:
            raise ValueError(
                f"a request must hold 1..{self.policy.max_batch_size} rows, got {rows}"
            )
        timeout = limits.timeout_ms if timeout_ms is None else timeout_ms
        if not timeout > 0:  # also refuses NaN
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        q = self._lanes[lane]
        if q.count >= limits.max_queue_items:
            raise QueueFullError(q.count, self.policy.retry_after_ms)
        entry = Queued(
            item=item,
            lane=lane,
            rows=rows,
            group=group,
            enqueued_s=now_s,
            deadline_s=now_s + timeout / 1000.0,
            formed_before=self._formed,
        )
        q.entries.append(entry)
        q.count += 1
        q.rows += rows
        self._tiebreak += 1
        heapq.heappush(self._deadlines, (entry.deadline_s, self._tiebreak, entry))
        self._compact_deadlines()
        return entry

    def poll(self, now_s: float, *, force: bool = False) -> Poll[T]:
        """What is due at ``now_s``: every request whose deadline passed (first, so none is
        ever batched late), then the batch of the lane whose turn it is, if any lane has one
        ready. ``force`` treats every non-empty lane as ready (used to drain)."""
        expired = self._expire(now_s)
        ready = [lane for lane in LANES if self._ready(lane, now_s, force)]
        if not ready:
            return Poll(expired=tuple(expired))
        lane = self._choose(ready)
        return Poll(expired=tuple(expired), batch=self._take(lane, now_s))

    def next_wakeup_s(self) -> float | None:
        """When :meth:`poll` next has something to do (possibly in the past): the earliest
        moment a lane's batch becomes ready or a deadline passes; None when idle."""
        due: float | None = None
        for lane in LANES:
            q = self._lanes[lane]
            head = q.head()
            if head is None:
                continue
            t = (
                head.enqueued_s
                if self._full(q)
                else head.enqueued_s + self.policy.max_queue_delay_s
            )
            due = t if due is None else min(due, t)
        while self._deadlines and not self._deadlines[0][2].waiting:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            d = self._deadlines[0][0]
            due = d if due is None else min(due, d)
        return due

    # internals

    def _full(self, q: _LaneQueue[T]) -> bool:
        """Enough rows wait for a full or a preferred batch."""
        if q.rows >= self.policy.max_batch_size:
            return True
        sizes = self.policy.preferred_batch_sizes
        return bool(sizes) and q.rows >= sizes[0]

    def _ready(self, lane: Lane, now_s: float, force: bool) -> bool:
        q = self._lanes[lane]
        head = q.head()
        if head is None:
            return False
        return force or self._full(q) or now_s >= head.enqueued_s + self.policy.max_queue_delay_s

    def _choose(self, ready: Sequence[Lane]) -> Lane:
        total = 0
        best = ready[0]
        for lane in ready:  # priority order, so ties go to the higher lane
            q = self._lanes[lane]
            weight = self.policy.lanes[lane].weight
            q.credit += weight
            total += weight
            if q.credit > self._lanes[best].credit:
                best = lane
        self._lanes[best].credit -= total
        return best

    def _limit(self, q: _LaneQueue[T]) -> int:
        """Rows the next batch of ``q`` may hold: the largest preferred size reachable,
        otherwise ``max_batch_size``."""
        reachable = [s for s in self.policy.preferred_batch_sizes if s <= q.rows]
        return reachable[-1] if reachable else self.policy.max_batch_size

    def _take(self, lane: Lane, now_s: float) -> LaneBatch[T]:
        q = self._lanes[lane]
        limit = self._limit(q)
        head = q.head()
        if head is None:
            raise RuntimeError(f"lane {lane} has no batch to take")
        taken: list[Queued[T]] = []
        rows = 0
        while q.entries:
            entry = q.entries[0]
            if not entry.waiting:
                q.entries.popleft()
                continue
            if taken and (rows + entry.rows > limit or entry.group != head.group):
                break
            q.entries.popleft()
            entry.waiting = False
            taken.append(entry)
            rows += entry.rows
            q.count -= 1
            q.rows -= entry.rows
        if q.count == 0:
            q.credit = 0
        batch = LaneBatch(lane=lane, entries=tuple(taken), formed_s=now_s, index=self._formed)
        self._formed += 1
        return batch

    def _expire(self, now_s: float) -> list[Queued[T]]:
        expired: list[Queued[T]] = []
        while self._deadlines and self._deadlines[0][0] <= now_s:
            _, _, entry = heapq.heappop(self._deadlines)
            if not entry.waiting:
                continue
            entry.waiting = False
            q = self._lanes[entry.lane]
            q.count -= 1
            q.rows -= entry.rows
            if q.count == 0:
                q.credit = 0
            expired.append(entry)
        return expired

    def _compact_deadlines(self) -> None:
        # Entries that left in a batch stay in the heap until their deadline surfaces; with
        # long timeouts that is many. Rebuild once they outnumber the waiting ones.
        n = len(self._deadlines)
        if n > 1024 and n > 2 * len(self) + 1024:  # the cheap test first: this runs per add
            self._deadlines = [d for d in self._deadlines if d[2].waiting]
            heapq.heapify(self._deadlines)


class LaneBatcher(Generic[T]):
    """Runs a :class:`LaneScheduler` on one consumer thread.

    ``submit`` may be called from any thread. On the runner's thread, ``run_batch(batch)``
    runs one batch at a time and ``on_expired(entries)`` rejects requests whose deadline
    passed; exceptions from either are logged and counted, and the runner carries on: the
    callbacks answer their own requests first. Anything that escapes the scheduling itself
    leaves its queues in a state that cannot be trusted: the thread ends, and with a
    ``supervisor`` (kind ``scheduler``, fatal) its owner reports not ready for good. ``stop``
    refuses new requests, runs (or, past their deadline, expires) everything waiting, and
    joins.
    """

    def __init__(
        self,
        policy: SchedulerPolicy,
        run_batch: Callable[[LaneBatch[T]], None],
        on_expired: Callable[[Sequence[Queued[T]]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "fogline-scheduler",
        supervisor: Supervisor | None = None,
    ) -> None:
        self._scheduler: LaneScheduler[T] = LaneScheduler(policy)
        self._supervisor = supervisor or Supervisor(f"scheduler {name}", log)
        self._run_batch = run_batch
        self._on_expired = on_expired
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        # When the runner sleeps, the moment it will wake by itself (inf: not until told);
        # None while it is awake. A submit wakes it only when the new request makes
        # something due earlier: a wake-up costs the submitting thread tens of microseconds,
        # and most requests join a batch that is already due at the same moment.
        self._sleeping_until: float | None = None
        self._failures = 0
        self._thread = self._supervisor.thread("scheduler", self._run, fatal=True, name=name)

    @property
    def policy(self) -> SchedulerPolicy:
        return self._scheduler.policy

    @property
    def failures(self) -> int:
        """Callbacks that raised (logged; the runner carried on)."""
        with self._cond:
            return self._failures

    @property
    def name(self) -> str:
        return self._thread.name

    def depth(self, lane: Lane | None = None) -> int:
        """Requests waiting in ``lane`` (all lanes when None)."""
        with self._cond:
            if lane is None:
                return len(self._scheduler)
            return self._scheduler.depth(lane)

    @property
    def batches_formed(self) -> int:
        with self._cond:
            return self._scheduler.batches_formed

    def submit(
        self,
        lane: Lane,
        item: T,
        *,
        rows: int = 1,
        timeout_ms: float | None = None,
        group: Hashable = None,
    ) -> Queued[T]:
        """Queue an item; raises :class:`QueueFullError` when its lane is at its bound and
        ``RuntimeError`` once the batcher is stopping."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            entry = self._scheduler.add(
                lane, item, self._clock(), rows=rows, timeout_ms=timeout_ms, group=group
            )
            until = self._sleeping_until
            if until is not None:
                due = self._scheduler.next_wakeup_s()
                if due is not None and due < until:
                    self._sleeping_until = None
                    # All: a wait_idle caller may be waiting on the same condition.
                    self._cond.notify_all()
            return entry

    def submit_many(
        self,
        lane: Lane,
        items: Sequence[tuple[T, int, Hashable]],
        *,
        timeout_ms: float | None = None,
    ) -> int:
        """Queue ``(item, rows, group)`` triples in order under one lock and at most one
        wake-up (the items of one MQTT message arrive together and should batch together).
        Returns how many were queued: the rest found the lane full. Raises
        ``RuntimeError`` once the batcher is stopping."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            now = self._clock()
            queued = 0
            for item, rows, group in items:
                try:
                    self._scheduler.add(
                        lane, item, now, rows=rows, timeout_ms=timeout_ms, group=group
                    )
                except QueueFullError:
                    break
                queued += 1
            until = self._sleeping_until
            if queued and until is not None:
                due = self._scheduler.next_wakeup_s()
                if due is not None and due < until:
                    self._sleeping_until = None
                    self._cond.notify_all()
            return queued

    def start(self) -> None:
        self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued and no batch is running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._busy and len(self._scheduler) == 0, timeout_s
            )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests, run what is waiting, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "scheduler %s did not drain within %.0f s", self._thread.name, timeout_s
                )

    def _next(self) -> Poll[T] | None:
        with self._cond:
            while True:
                now = self._clock()
                polled = self._scheduler.poll(now, force=self._stopping)
                if polled.expired or polled.batch is not None:
                    self._busy = True
                    return polled
                if self._stopping:
                    return None
                due = self._scheduler.next_wakeup_s()
                self._sleeping_until = math.inf if due is None else due
                self._cond.wait(None if due is None else max(0.0, due - now))
                self._sleeping_until = None

    def _run(self) -> None:
        while (polled := self._next()) is not None:
            try:
                if polled.expired:
                    n = len(polled.expired)
                    self._supervised(self._on_expired, polled.expired, f"{n} expired requests")
                if (batch := polled.batch) is not None:
                    what = f"a batch of {len(batch)} requests in the {batch.lane.value} lane"
                    self._supervised(self._run_batch, batch, what)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _supervised(self, call: Callable[[Any], None], arg: object, what: str) -> None:
        # The supervisor of a long-lived thread: the callbacks answer their own requests
        # and map the errors they expect; whatever still escapes is a bug, and letting it
        # end this thread would strand every request queued behind it. So it is logged
        # with its traceback, counted, and the runner carries on.
        try:
            call(arg)
        except Exception as exc:  # noqa: BLE001 - the batch thread's supervisor, per batch
            with self._cond:
                self._failures += 1
            self._supervisor.contained("scheduler", f"{what} of {self.name}", exc)
