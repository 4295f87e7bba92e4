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
re-send. The mirror always equals the file: a transaction that fails (whether SQLite
rolled it back itself, as a COMMIT on a full disk does, or the ROLLBACK here did) is
followed by reading the mirror back from the file.

The outbox does not fill its own file system. Before each transaction it looks at the
space left: when less than the write-ahead log's size plus :data:`RESERVE_BYTES` is free,
the log is checkpointed into the database and truncated (SQLite's automatic checkpoint,
at 1,000 pages, is never reached on a file system of a few hundred KiB), and new items
are refused (:class:`~.errors.OutboxStorageFullError`) while less than
:data:`RESERVE_BYTES` plus their own size would be left, so that the deletes of answered
items, which free space, always have room for their log frames.

Rows are read defensively: a row whose columns have the wrong type or length (a damaged
file, or one written by something else) is not an item; it is reported by
:meth:`Outbox.take_damaged` (and :meth:`Outbox.payload` raises :class:`DamagedRowError`
for one found at a re-send) so that the agent can move it to the ``quarantine`` table of
the same file (:meth:`Outbox.quarantine`), where it is kept for inspection and never
sent. SQLite is used through the standard library: no ORM fits a single-table,
single-process queue better, and the file stays readable with the ``sqlite3`` shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import OutboxInUseError, OutboxStorageFullError

__all__ = [
    "MIN_FREE_BYTES",
    "QUARANTINE_KEEP",
    "RESERVE_BYTES",
    "DamagedRow",
    "DamagedRowError",
    "Eviction",
    "Outbox",
    "OutboxItem",
    "OutboxLimits",
    "free_bytes",
]

EvictionReason = Literal["max_items", "max_bytes", "max_age"]
# Why a row was quarantined (the metric's label): its columns, its envelope, or an
# envelope that belongs to another item (message id, site or kind differ).
DamageKind = Literal["bad_row", "bad_envelope", "wrong_item"]

# Space kept free on the outbox's file system for the write-ahead log of deletes: new
# items are refused below it. 16 pages: a delete of a few dozen answered items (leaf
# pages, their parents, the freelist) fits several times over.
RESERVE_BYTES = 64 * 1024
# After a checkpoint, SQLite truncates the write-ahead log to this size rather than
# keeping it at its largest (a burst of big transactions would otherwise hold that space
# for good). About the size at which the automatic checkpoint runs (1,000 pages).
_WAL_LIMIT_BYTES = 4 * 1024 * 1024
# The quarantine table keeps the most recent rows only: a damaged file must not grow it
# without bound.
QUARANTINE_KEEP = 1000
# The least free space an outbox runs in, measured on tmpfs (docs/agent.md): SQLite's
# shared-memory index (``-shm``, 32 KiB), the database's first pages, the first log frames
# and the reserve, with room for a few items.
MIN_FREE_BYTES = 112 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    message_id BLOB PRIMARY KEY,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    created_s REAL NOT NULL,
    tag TEXT
) WITHOUT ROWID
"""
# Created at the first quarantine, not at open, so that an agent whose disk is full still
# opens its outbox and delivers its backlog. Columns without types keep whatever was found.
_QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    message_id, payload, priority, created_s, tag,
    reason TEXT NOT NULL,
    quarantined_s REAL NOT NULL
)
"""
# Every row, typed by SQLite itself: a value of the wrong type is reported, never
# converted. Blobs and text come back as bytes (a text column with bytes that are not
# UTF-8 would otherwise fail the whole query).
_LOAD = """
SELECT typeof(message_id), CAST(message_id AS BLOB),
       typeof(payload), length(CAST(payload AS BLOB)),
       typeof(priority), CASE typeof(priority) WHEN 'integer' THEN priority END,
       typeof(created_s),
       CASE WHEN typeof(created_s) IN ('integer', 'real') THEN created_s END,
       typeof(tag), CAST(tag AS BLOB)
FROM outbox
"""
_Row = tuple[
    str, bytes | None, str, int | None, str, int | None, str, float | None, str, bytes | None
]


def free_bytes(path: Path | str) -> int | None:
    """Bytes free on the file system that holds (or will hold) the file ``path``; None
    when it cannot be asked."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


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


@dataclass(frozen=True, slots=True)
class DamagedRow:
    """A row of the outbox file that is not a usable item.

    ``key_type`` and ``key`` are its message id as SQLite holds it (``typeof`` and the
    bytes; ``key`` None for NULL): what finds the row again to move it. ``kind`` is the
    metric's label, ``reason`` says what is wrong, ``tag`` is its tag when readable."""

    key_type: str
    key: bytes | None
    kind: DamageKind
    reason: str
    tag: str | None = None

    @property
    def message_id(self) -> bytes | None:
        """The item's message id, when the row's key is one (16 bytes, a blob)."""
        if self.key_type == "blob" and self.key is not None and len(self.key) == 16:
            return self.key
        return None


class DamagedRowError(ValueError):
    """The row asked for is damaged (see :class:`DamagedRow`, in ``row``)."""

    def __init__(self, row: DamagedRow) -> None:
        super().__init__(row.reason)
        self.row = row


def check_row(row: _Row) -> tuple[OutboxItem | None, DamagedRow | None]:
    """A row as :data:`_LOAD` reads it: the item it holds, or why it holds none."""
    (
        key_type,
        key,
        payload_type,
        size,
        prio_type,
        prio,
        created_type,
        created,
        tag_type,
        tag_raw,
    ) = row
    tag: str | None = None
    tag_problem = None
    if tag_type == "text" and tag_raw is not None:
        try:
            tag = tag_raw.decode("utf-8")
        except UnicodeDecodeError:
            tag_problem = "its tag is not UTF-8 text"
    elif tag_type != "null":
        tag_problem = f"its tag is {tag_type}, not text"

    def damaged(reason: str) -> tuple[None, DamagedRow]:
        return None, DamagedRow(key_type, key, "bad_row", reason, tag)

    if key_type != "blob" or key is None:
        return damaged(f"its message id is {key_type}, not a blob")
    if len(key) != 16:
        return damaged(f"its message id is {len(key)} bytes, not 16")
    if payload_type != "blob" or size is None:
        return damaged(f"its payload is {payload_type}, not a blob")
    if size == 0:
        return damaged("its payload is empty")
    if prio_type != "integer" or prio is None:
        return damaged(f"its priority is {prio_type}, not an integer")
    if created is None or not math.isfinite(created):
        return damaged(f"its creation time is {created_type}, not a number of seconds")
    if tag_problem is not None:
        return damaged(tag_problem)
    return OutboxItem(bytes(key), int(size), int(prio), float(created), tag), None


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
        self._wal = self.path.with_name(self.path.name + "-wal")
        self._where = str(self.path)
        self._items: dict[bytes, OutboxItem] = {}
        self._bytes = 0
        # Eviction order: (priority, created_s, seq) with lazy deletion of removed entries.
        self._order: list[tuple[int, float, int, bytes]] = []
        self._seq = itertools.count()
        # Damaged rows still in the file (by key), and those not yet taken by the agent.
        self._damaged: dict[tuple[str, bytes | None], DamagedRow] = {}
        self._found: list[DamagedRow] = []
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            self._db.execute(_SCHEMA)
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._load()
        except BaseException:
            self._db.close()
            self._release_lock()
            raise

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
        """The stored envelope for ``message_id`` (None if it was removed meanwhile).

        Raises :class:`DamagedRowError` when the stored value is not the blob that was
        stored (another type, another length)."""
        with self._lock:
            row = self._db.execute(
                "SELECT typeof(payload), CAST(payload AS BLOB) FROM outbox WHERE message_id = ?",
                (message_id,),
            ).fetchone()
            item = self._items.get(message_id)
        if row is None:
            return None
        kind, value = row
        tag = None if item is None else item.tag
        if kind != "blob" or value is None:
            reason = f"its payload is {kind}, not a blob"
            raise DamagedRowError(DamagedRow("blob", message_id, "bad_row", reason, tag))
        payload = bytes(value)
        if item is not None and len(payload) != item.size:
            reason = f"its payload is {len(payload)} bytes, {item.size} when it was stored"
            raise DamagedRowError(DamagedRow("blob", message_id, "bad_row", reason, tag))
        return payload

    def take_damaged(self) -> list[DamagedRow]:
        """Damaged rows found since the last call (at open, or when the mirror was read
        back after a failed transaction); each is reported once."""
        with self._lock:
            found, self._found = self._found, []
        return found

    def damaged(self) -> list[DamagedRow]:
        """Every damaged row known to be still in the file (not an item, never sent)."""
        with self._lock:
            return list(self._damaged.values())

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
            self._make_room(sum(len(entry[1]) for entry in add))
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
                self._after_failure(new, (*held, *replaced, *(e.item for e in evicted)))
                raise
        return evicted, held

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database and truncate it to nothing."""
        with self._lock:
            self._checkpoint()

    def free_bytes(self) -> int | None:
        """Bytes free on the outbox's file system (None when it cannot be asked)."""
        return free_bytes(self._where)

    def quarantine(self, row: DamagedRow, *, now_s: float | None = None) -> bool:
        """Move a damaged row out of the outbox, into the ``quarantine`` table of the same
        file (which keeps the latest :data:`QUARANTINE_KEEP`), in one transaction; the
        item it was, if any, leaves the mirror. Returns whether the row was still there.
        On failure the row stays where it was, in the file and in memory."""
        when = time.time() if now_s is None else now_s
        args: tuple[object, ...]
        if row.key_type == "blob":
            match, args = "message_id = ?", (row.key,)
        else:  # a key of another type: found by its type and bytes (a scan; rare)
            match = "typeof(message_id) = ? AND CAST(message_id AS BLOB) IS ?"
            args = (row.key_type, row.key)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(_QUARANTINE_SCHEMA)
                moved = self._db.execute(
                    "INSERT INTO quarantine"  # noqa: S608 (match is one of two constants)
                    " SELECT message_id, payload, priority, created_s, tag, ?, ?"
                    f" FROM outbox WHERE {match}",
                    (f"{row.kind}: {row.reason}", when, *args),
                ).rowcount
                self._db.execute(f"DELETE FROM outbox WHERE {match}", args)  # noqa: S608
                self._db.execute(
                    "DELETE FROM quarantine WHERE rowid <= (SELECT max(rowid) FROM quarantine) - ?",
                    (QUARANTINE_KEEP,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(Exception):  # the first error is the one to see
                        self._db.execute("ROLLBACK")
                raise
            self._damaged.pop((row.key_type, row.key), None)
            mid = row.message_id
            item = None if mid is None else self._items.get(mid)
            if item is not None:
                self._forget(item)
        return moved > 0

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

    def _load(self) -> None:
        """Read the mirror from the file; damaged rows are set aside, not mirrored."""
        items: dict[bytes, OutboxItem] = {}
        damaged: dict[tuple[str, bytes | None], DamagedRow] = {}
        for raw in self._db.execute(_LOAD):
            item, bad = check_row(raw)
            if item is not None:
                items[item.message_id] = item
            elif bad is not None:
                damaged[(bad.key_type, bad.key)] = bad
        self._items = {}
        self._bytes = 0
        self._order = []
        for item in items.values():
            self._remember(item)
        self._found += [row for key, row in damaged.items() if key not in self._damaged]
        self._damaged = damaged

    def _after_failure(self, new: Sequence[OutboxItem], old: Iterable[OutboxItem]) -> None:
        """A transaction failed: end it and make the mirror equal the file again.

        SQLite may have rolled it back already (a COMMIT that fails on a full disk has,
        and a ROLLBACK then raises "no transaction is active"), so it is rolled back here
        only if still open. The mirror is then read back from the file, which is the
        truth whatever SQLite did; only if that read fails too is the mirror put back by
        undoing in memory what the transaction would have changed (exact once rolled
        back). The transaction's own error is what the caller sees."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._load()
        except Exception:  # noqa: BLE001 (the caller gets the transaction's own error)
            for item in new:
                if self._items.get(item.message_id) is item:
                    self._forget(item)
            fresh = {id(item) for item in new}
            for item in old:
                if id(item) not in fresh and item.message_id not in self._items:
                    self._remember(item)

    def _wal_bytes(self) -> int:
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0

    def _checkpoint(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _make_room(self, incoming: int) -> None:
        """Before a transaction: truncate the log when space runs short, and refuse new
        items (``incoming`` payload bytes) that would leave less than the reserve."""
        free = self.free_bytes()
        if free is None:
            return  # nothing to go by: SQLite's own SQLITE_FULL still says so
        if free > 2 * (_WAL_LIMIT_BYTES + RESERVE_BYTES + incoming):
            return  # plenty: one system call, nothing else
        if free < self._wal_bytes() + RESERVE_BYTES:
            try:
                self._checkpoint()
            except Exception:
                # Deletes may still fit where the checkpoint did not: let them try.
                if incoming:
                    raise
                return
            free = self.free_bytes() or 0
        if not incoming:
            return
        # Pages the file freed (answered items) take new rows without growing it; the log
        # frames they pass through are given back by the next checkpoint.
        spare = int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * self._page_size
        if free + spare < RESERVE_BYTES + incoming:
            raise OutboxStorageFullError(
                f"outbox storage full: {free} bytes free on the file system of {self.path} "
                f"and {spare} in the file, {RESERVE_BYTES + incoming} needed to store "
                f"{incoming} more bytes (the outbox keeps {RESERVE_BYTES} free so that "
                "answered items can still be deleted)"
            )

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
