"""Dynamic batching: which waiting items run together, and when.

:class:`BatchFormer` is the whole policy and does no I/O and reads no clock: callers pass
the time in, so tests drive it with a fake clock. Items are queued per key (the bundle
id), so items for different bundles never share a batch. A batch is ready when its key
has ``max_batch_size`` items waiting, or when its oldest item has waited
``max_queue_delay_ms``. The queue is bounded across all keys; a full queue refuses new
items with :class:`QueueFullError` instead of growing without limit.

:class:`BatchRunner` is the thin threaded adapter: one consumer thread that sleeps until
the next batch is due and hands it to a callback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fogline.cloud_service.errors import QueueFullError

__all__ = ["Batch", "BatchFormer", "BatchPolicy", "BatchRunner"]

log = logging.getLogger("fogline.cloud.batcher")

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """Batch size and delay bounds, and the total queue bound."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_items: int = 10_000
    retry_after_ms: int = 100

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0 or not math.isfinite(self.max_queue_delay_ms):
            raise ValueError(
                f"max_queue_delay_ms must be finite and >= 0, got {self.max_queue_delay_ms}"
            )
        if self.max_queue_items < 1:
            raise ValueError(f"max_queue_items must be at least 1, got {self.max_queue_items}")
        if self.retry_after_ms < 1:
            raise ValueError(f"retry_after_ms must be at least 1, got {self.retry_after_ms}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items of one key, oldest first, with the times they were queued."""

    key: str
    items: tuple[T, ...]
    enqueued_s: tuple[float, ...]
    formed_s: float

    def __len__(self) -> int:
        return len(self.items)


class BatchFormer(Generic[T]):
    """Per-key FIFO queues and the rule that turns them into batches. Not thread-safe."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._queues: dict[str, deque[tuple[T, float]]] = {}
        self._depth = 0

    def __len__(self) -> int:
        """Items waiting, over all keys."""
        return self._depth

    def depth(self, key: str) -> int:
        q = self._queues.get(key)
        return len(q) if q else 0

    def add(self, key: str, item: T, now_s: float) -> bool:
        """Queue ``item`` under ``key`` at time ``now_s``.

        Returns True when the item makes a batch due earlier than before (it is the key's
        first item, or it fills the batch), i.e. when a waiting consumer should wake up.
        Raises :class:`QueueFullError` when ``max_queue_items`` are already waiting.
        """
        if self._depth >= self.policy.max_queue_items:
            raise QueueFullError(self._depth, self.policy.retry_after_ms)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        q.append((item, now_s))
        self._depth += 1
        return len(q) == 1 or len(q) == self.policy.max_batch_size

    def next_due_s(self) -> float | None:
        """When the next batch becomes ready (possibly in the past), or None if idle."""
        due: float | None = None
        for q in self._queues.values():
            if not q:
                continue
            t = q[0][1] if len(q) >= self.policy.max_batch_size else q[0][1] + self._delay()
            due = t if due is None else min(due, t)
        return due

    def pop_ready(self, now_s: float, *, force: bool = False) -> Batch[T] | None:
        """The batch that is due at ``now_s``, if any; with ``force``, any waiting batch.

        Of several due batches, the one whose oldest item has waited longest goes first,
        so a busy bundle cannot starve a quiet one.
        """
        best_key: str | None = None
        best_head = math.inf
        full = self.policy.max_batch_size
        for key, q in self._queues.items():
            if not q:
                continue
            head = q[0][1]
            due = force or len(q) >= full or now_s >= head + self._delay()
            if due and head < best_head:
                best_key, best_head = key, head
        if best_key is None:
            return None
        return self._take(best_key, now_s)

    def _delay(self) -> float:
        return self.policy.max_queue_delay_s

    def _take(self, key: str, now_s: float) -> Batch[T]:
        q = self._queues[key]
        n = min(len(q), self.policy.max_batch_size)
        taken = [q.popleft() for _ in range(n)]
        if not q:
            del self._queues[key]
        self._depth -= n
        return Batch(
            key=key,
            items=tuple(item for item, _ in taken),
            enqueued_s=tuple(t for _, t in taken),
            formed_s=now_s,
        )


class BatchRunner(Generic[T]):
    """Runs a :class:`BatchFormer` on one consumer thread.

    ``submit`` may be called from any thread; ``handle(batch)`` runs on the runner's
    thread, one batch at a time. An exception from ``handle`` is logged and the runner
    carries on. ``stop`` hands every still-waiting item to ``handle`` before returning.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        handle: Callable[[Batch[T]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str = "fogline-batcher",
    ) -> None:
        self._former: BatchFormer[T] = BatchFormer(policy)
        self._handle = handle
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def depth(self) -> int:
        return len(self._former)

    @property
    def policy(self) -> BatchPolicy:
        return self._former.policy

    def submit(self, key: str, item: T) -> None:
        """Queue an item; raises :class:`QueueFullError` when the queue is at its bound."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batch runner is stopped")
            if self._former.add(key, item, self._clock()):
                self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued and no batch is running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and len(self._former) == 0, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting items, run what is waiting, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _next(self) -> Batch[T] | None:
        with self._cond:
            while True:
                now = self._clock()
                batch = self._former.pop_ready(now, force=self._stopping)
                if batch is not None or self._stopping:
                    self._busy = batch is not None
                    return batch
                due = self._former.next_due_s()
                self._cond.wait(None if due is None else max(0.0, due - now))

    def _run(self) -> None:
        while (batch := self._next()) is not None:
            try:
                self._handle(batch)
            except Exception:
                log.exception("batch of %d for %s failed", len(batch), batch.key)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
