"""The agent's durable outbox: every forwarded envelope, kept until the cloud answers it.

One SQLite file per agent, in WAL mode. An envelope is committed here *before* it is
published and deleted only once its answer has arrived, so a crash (``kill -9``) or a
power cut at any moment leaves every unanswered item on disk to be re-sent; the cloud
deduplicates by message id, so a re-send is harmless.

With ``synchronous = "full"`` (the default) each transaction is fsynced before it
returns: inserts survive a power cut, not only a process crash. The agent commits in
groups (:meth:`Outbox.commit`: the answered items of a burst and the new items of the
model batches that came meanwhile, in one transaction), which keeps the fsync (about
0.3 ms here) off the per-item path and halves the number of them. ``"normal"`` skips the
fsync: a process crash still loses nothing, a power cut may lose the last transactions.

Bounds (``max_items``, ``max_bytes``, ``max_age_s``) are enforced here. When adding an
item would cross a size bound, items are evicted in a fixed order: lowest ``priority``
first, and among equal priorities the oldest first (the item least likely to still
matter). Items older than ``max_age_s`` are evicted by :meth:`Outbox.expire`. Every
eviction is returned to the caller with its reason, which counts and logs it.

The metadata of every item (size, priority, age, tag) is mirrored in memory, so bounds,
depth and eviction order cost no query; payloads stay on disk and are read back only to
re-send. SQLite is used through the standard library: no ORM fits a single-table,
single-process queue better, and the file stays readable with the ``sqlite3`` shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import OutboxInUseError

__all__ = ["Eviction", "Outbox", "OutboxItem", "OutboxLimits"]

EvictionReason = Literal["max_items", "max_bytes", "max_age"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    message_id BLOB PRIMARY KEY,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    created_s REAL NOT NULL,
    tag TEXT
) WITHOUT ROWID
"""


def _hold_lock(path: Path) -> int:
    """Take ``<outbox>.lock`` for as long as the outbox is open, or refuse.

    ``flock`` on a file of its own rather than SQLite's locking: SQLite lets two
    connections share a WAL database by design, which is exactly what must not happen
    here. The lock goes with the process (a killed agent leaves no stale lock); the file
    names the holder's pid for the error message.
    """
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise OutboxInUseError(
            f"the outbox {path} is in use by another agent{who}: two agents must not share "
            "one outbox; give each its own site or outbox path"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of one outbox; see the module docstring for the eviction order."""

    max_items: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {self.max_items}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if not self.max_age_s > 0:
            raise ValueError(f"max_age_s must be positive, got {self.max_age_s}")


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One envelope waiting for its answer (metadata only; the payload stays on disk)."""

    message_id: bytes
    size: int
    priority: int
    created_s: float
    tag: str | None


@dataclass(frozen=True, slots=True)
class Eviction:
    """An item removed unanswered because a bound was reached."""

    item: OutboxItem
    reason: EvictionReason


class OutboxFullError(ValueError):
    """A single item is larger than the outbox's ``max_bytes``."""


class Outbox:
    """A bounded, durable queue of envelopes keyed by message id. Thread-safe."""

    def __init__(
        self,
        path: str | Path,
        limits: OutboxLimits | None = None,
        *,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _hold_lock(self.path)
        try:
            # The payloads are the site's data: readable by the agent's user only.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except BaseException:
            self._release_lock()
            raise
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute(_SCHEMA)
        self._items: dict[bytes, OutboxItem] = {}
        self._bytes = 0
        # Eviction order: (priority, created_s, seq) with lazy deletion of removed entries.
        self._order: list[tuple[int, float, int, bytes]] = []
        self._seq = itertools.count()
        for mid, size, priority, created_s, tag in self._db.execute(
            "SELECT message_id, length(payload), priority, created_s, tag FROM outbox"
        ):
            self._remember(OutboxItem(bytes(mid), int(size), int(priority), float(created_s), tag))

    # reading

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._items

    @property
    def total_bytes(self) -> int:
        """Total payload bytes held."""
        return self._bytes

    def items(self) -> list[OutboxItem]:
        """Every item held, oldest first."""
        with self._lock:
            return sorted(self._items.values(), key=lambda it: it.created_s)

    def get(self, message_id: bytes) -> OutboxItem | None:
        return self._items.get(message_id)

    def oldest_created_s(self) -> float | None:
        """Wall-clock creation time of the oldest item, or None when empty."""
        with self._lock:
            if not self._items:
                return None
            return min(it.created_s for it in self._items.values())

    def payload(self, message_id: bytes) -> bytes | None:
        """The stored envelope for ``message_id`` (None if it was removed meanwhile)."""
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM outbox WHERE message_id = ?", (message_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    # writing

    def add_many(
        self,
        entries: Sequence[tuple[bytes, bytes, int, str | None]],
        *,
        now_s: float | None = None,
    ) -> list[Eviction]:
        """Store ``(message_id, payload, priority, tag)`` entries in one transaction.

        Returns the items evicted to make room (possibly some of the new ones, when they
        rank lowest). Raises :class:`OutboxFullError` for an item larger than ``max_bytes``
        (nothing is stored then).
        """
        return self.commit(entries, (), now_s=now_s)[0]

    def remove_many(self, message_ids: Iterable[bytes]) -> list[OutboxItem]:
        """Delete items (answered ones) in one transaction; returns those that were held."""
        return self.commit((), message_ids)[1]

    def commit(
        self,
        add: Sequence[tuple[bytes, bytes, int, str | None]],
        remove: Iterable[bytes],
        *,
        now_s: float | None = None,
    ) -> tuple[list[Eviction], list[OutboxItem]]:
        """Delete the answered items in ``remove``, then store the ``add`` entries
        ``(message_id, payload, priority, tag)``, in one transaction: one fsync for both
        (group commit). Returns the evictions that made room and the removed items that
        were held. Raises :class:`OutboxFullError` for an entry larger than ``max_bytes``
        and leaves everything as it was when the transaction fails.
        """
        lim = self.limits
        for mid, payload, _priority, _tag in add:
            if len(payload) > lim.max_bytes:
                raise OutboxFullError(
                    f"an envelope of {len(payload)} bytes exceeds the outbox bound of "
                    f"{lim.max_bytes} bytes"
                )
            if len(mid) != 16:
                raise ValueError("message ids are 16 bytes")
        created = time.time() if now_s is None else now_s
        with self._lock:
            held = [self._items[m] for m in dict.fromkeys(remove) if m in self._items]
            if not add and not held:
                return [], []
            for item in held:
                self._forget(item)
            new = [OutboxItem(mid, len(p), prio, created, tag) for mid, p, prio, tag in add]
            replaced: list[OutboxItem] = []
            for item in new:
                old = self._items.get(item.message_id)
                if old is not None:
                    replaced.append(old)
                    self._forget(old)
                self._remember(item)
            evicted = self._evict_over_bounds()
            gone = {e.item.message_id for e in evicted}
            rows = [
                (mid, payload, prio, created, tag)
                for mid, payload, prio, tag in add
                if mid not in gone
            ]
            deleted = [(it.message_id,) for it in held]
            deleted += [(mid,) for mid in gone]
            self._db.execute("BEGIN")
            try:
                if deleted:
                    self._db.executemany("DELETE FROM outbox WHERE message_id = ?", deleted)
                if rows:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO outbox"
                        " (message_id, payload, priority, created_s, tag) VALUES (?, ?, ?, ?, ?)",
                        rows,
                    )
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (a full disk) has rolled back already, and a
                # ROLLBACK then would raise "no transaction is active" over the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                # Memory follows the file again: what the transaction would have changed.
                for item in new:
                    if self._items.get(item.message_id) is item:
                        self._forget(item)
                fresh = {id(item) for item in new}
                for item in (*held, *replaced, *(e.item for e in evicted)):
                    if id(item) not in fresh and item.message_id not in self._items:
                        self._remember(item)
                raise
        return evicted, held

    def expire(self, now_s: float | None = None) -> list[Eviction]:
        """Evict every item older than ``max_age_s``."""
        now = time.time() if now_s is None else now_s
        horizon = now - self.limits.max_age_s
        with self._lock:
            old = [it for it in self._items.values() if it.created_s < horizon]
        if not old:
            return []
        removed = self.remove_many(it.message_id for it in old)
        return [Eviction(it, "max_age") for it in removed]

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            finally:
                self._release_lock()

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    # internals (lock held)

    def _remember(self, item: OutboxItem) -> None:
        self._items[item.message_id] = item
        self._bytes += item.size
        heapq.heappush(
            self._order, (item.priority, item.created_s, next(self._seq), item.message_id)
        )

    def _forget(self, item: OutboxItem) -> None:
        if self._items.pop(item.message_id, None) is not None:
            self._bytes -= item.size
        if len(self._order) > 4 * len(self._items) + 1024:
            self._order = [e for e in self._order if e[3] in self._items]
            heapq.heapify(self._order)

    def _evict_over_bounds(self) -> list[Eviction]:
        lim = self.limits
        out: list[Eviction] = []
        while self._order and (len(self._items) > lim.max_items or self._bytes > lim.max_bytes):
            reason: EvictionReason = (
                "max_items" if len(self._items) > lim.max_items else "max_bytes"
            )
            priority, created_s, _seq, mid = heapq.heappop(self._order)
            item = self._items.get(mid)
            if item is None or item.priority != priority or item.created_s != created_s:
                continue  # a stale heap entry
            self._forget(item)
            out.append(Eviction(item, reason))
        return out
