"""The outbox journal: new and answered items committed together, and the one place where
the outbox's SQLite and file-system errors become the agent's own.

New items (the forwarded items of a model batch, :class:`Outgoing`) and the ids of
answered items queue here; the journal thread (:meth:`Journal.run`) takes whatever has
queued and commits it in one transaction — one fsync for a whole burst — then hands the
stored items to the agent's ``release`` (register, then publish: nothing leaves the site
before it is on disk). While new items keep coming, deletes wait a few milliseconds for
the next insert's transaction instead of paying an fsync of their own.

When that transaction fails, each part is retried on its own, so a write the file refuses
cannot hold back new items: if the deletes keep failing (logged), the answered items stay
in the file and a restart hands them out again, marked ``recovered``; if the inserts keep
failing their callers get :class:`~fogline.edge_agent.errors.OutboxError` through
``fail`` (of the kind that says why: storage full, corrupt, transient) and nothing of them
is published. On a full disk the write-ahead log is checkpointed and truncated before the
transaction is tried again, and new items are not retried: they are refused at once
(:class:`~fogline.edge_agent.errors.OutboxStorageFullError`, "outbox storage full"), and
the next ones are stored as soon as there is room again.

What is read back to be re-sent is checked first (:meth:`Journal.envelope`): a stored
value of the wrong type or length, an envelope that does not decode (its checksum, its
framing) or one that names another item is not sent but reported as a
:class:`~._outbox.DamagedRow`, for the agent to quarantine (:meth:`Journal.quarantine`).

Every ``sqlite3`` and ``OSError`` raised by the outbox passes :func:`outbox_errors`, which
maps it to :class:`~fogline.edge_agent.errors.OutboxError` or one of its kinds (storage
full, corrupt, transient). No other module of the agent catches a ``sqlite3`` error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

from fogline.compression import EnvelopeError, Kind, decode_envelope
from fogline.edge_agent._outbox import (
    MIN_FREE_BYTES,
    RESERVE_BYTES,
    DamagedRow,
    DamagedRowError,
    Eviction,
    Outbox,
    OutboxFullError,
    OutboxItem,
    OutboxLimits,
    free_bytes,
)
from fogline.edge_agent.errors import (
    OutboxCorruptError,
    OutboxError,
    OutboxStorageFullError,
    OutboxTransientError,
)

__all__ = [
    "FULL_PREFIX",
    "Journal",
    "Outgoing",
    "envelope_damage",
    "map_outbox_error",
    "outbox_errors",
]

log = logging.getLogger("fogline.edge_agent")

T = TypeVar("T")
_R = TypeVar("_R")
Entry = tuple[bytes, bytes, int, str | None]  # message id, payload, priority, tag

_COMMIT_ATTEMPTS = 4
# Deletes per transaction on a full disk: 8 leaf pages and their parents in the log fit
# the outbox's reserve (RESERVE_BYTES, 16 pages) with room to spare.
_FULL_DELETE_STEP = 8
_FULL_LOG_EVERY_S = 10.0
_MAX_OPS = 4096
# While new items come in transactions less than _BUSY_GAP_S apart on average, the
# deletes of answered items (their answers are out already) wait up to _DELETE_WAIT_S for
# the next insert's transaction instead of an fsync of their own. At lower rates the fsync
# is cheaper than the wait, and they commit at once.
_BUSY_GAP_S = 0.002
_DELETE_WAIT_S = 0.004

# Primary result codes (the low byte of an extended code) by what they mean for us.
_FULL_CODES = frozenset({sqlite3.SQLITE_FULL})
# Extended codes that mean a full disk although their primary code says I/O error: the
# shared-memory index (``-shm``) could not grow, which is what opening a WAL database on a
# full file system meets first.
_FULL_EXTENDED_CODES = frozenset({sqlite3.SQLITE_IOERR_SHMSIZE})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_INTERRUPT,
    }
)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Every OutboxStorageFullError's message starts so: what callers and operators look for.
FULL_PREFIX = "outbox storage full: "
# The kinds an error of a whole group of items keeps (they take a message only).
_KINDS: tuple[type[OutboxError], ...] = (
    OutboxStorageFullError,
    OutboxCorruptError,
    OutboxTransientError,
)
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR})


def map_outbox_error(exc: BaseException, doing: str) -> OutboxError:
    """The agent's error for a ``sqlite3`` or ``OSError`` failure while ``doing`` (the
    message reads ``cannot <doing>: <upstream message>``). Anything else is a bug and is
    refused with ``TypeError``."""
    message = f"cannot {doing}: {exc}"
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in _FULL_CODES or code in _FULL_EXTENDED_CODES:
            return OutboxStorageFullError(FULL_PREFIX + message)
        if primary in _CORRUPT_CODES:
            return OutboxCorruptError(message)
        if primary in _TRANSIENT_CODES:
            return OutboxTransientError(message)
        if primary is None and isinstance(exc, sqlite3.OperationalError):
            return OutboxTransientError(message)
        # A bare DatabaseError is what sqlite3 raises for a damaged file or a non-database.
        if primary is None and type(exc) is sqlite3.DatabaseError:
            return OutboxCorruptError(message)
        return OutboxError(message)
    if isinstance(exc, OSError):
        if exc.errno in _FULL_ERRNOS:
            return OutboxStorageFullError(FULL_PREFIX + message)
        if exc.errno in _TRANSIENT_ERRNOS:
            return OutboxTransientError(message)
        return OutboxError(message)
    raise TypeError(f"not an outbox failure: {exc!r}")


@contextlib.contextmanager
def outbox_errors(doing: str) -> Iterator[None]:
    """Every ``sqlite3`` and ``OSError`` failure inside becomes an :class:`OutboxError`
    (see :func:`map_outbox_error`), raised from the original."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise map_outbox_error(exc, doing) from exc


def refused(n: int, error: BaseException) -> OutboxError:
    """The error of ``n`` new items the outbox would not store, of ``error``'s kind."""
    text = str(error)
    kind: type[OutboxError] = OutboxError
    for known in _KINDS:
        if isinstance(error, known):
            kind = known
            break
    if kind is OutboxStorageFullError:
        return kind(f"{FULL_PREFIX}the outbox refused {n} items: {text.removeprefix(FULL_PREFIX)}")
    return kind(f"the outbox refused {n} items: {text}")


def envelope_damage(payload: bytes, message_id: bytes, site: str) -> DamagedRow | None:
    """Why the stored ``payload`` of ``message_id`` must not be sent, or None.

    Decoded in full, as the cloud will: its checksum, framing and body, then that it is
    this item's own features envelope (a damaged key or id would otherwise be answered
    under another id, and the item re-sent for ever)."""
    try:
        env = decode_envelope(payload)
    except EnvelopeError as exc:
        return DamagedRow(
            "blob", message_id, "bad_envelope", f"its envelope does not decode: {exc}"
        )
    if env.kind is not Kind.FEATURES:
        reason = f"its envelope is a {env.kind.name.lower()} envelope, not features"
    elif env.message_id != message_id:
        reason = f"its envelope names message id {env.message_id.hex()}, not its own"
    elif env.site != site:
        reason = f"its envelope is for site {env.site!r}, not {site!r}"
    else:
        return None
    return DamagedRow("blob", message_id, "wrong_item", reason)


@dataclass(slots=True)
class Outgoing(Generic[T]):
    """The forwarded items of one model batch, on their way to the journal thread: outbox
    entries and, for each, the agent's own record of it and its caller (opaque here)."""

    done: threading.Event | None  # set once stored and released (submit_batch waits)
    entries: list[Entry] = field(default_factory=list)
    items: list[T] = field(default_factory=list)


Release = Callable[[list[Outgoing[T]], list[Eviction], bool], None]
Fail = Callable[[list[Outgoing[T]], OutboxError], None]


class Journal(Generic[T]):
    """The agent's only way to its outbox file.

    ``release(outgoing, evicted, stored)`` runs on the journal thread after each commit;
    ``fail(outgoing, error)`` when new items could not be stored or the release failed
    (their only outcome is then ``error``); ``finished(n)`` once the journal is done with
    ``n`` items (new or answered). Raises :class:`OutboxError` when the file cannot be
    opened."""

    def __init__(
        self,
        path: str | Path,
        limits: OutboxLimits,
        *,
        synchronous: Literal["full", "normal"],
        site: str,
        release: Release[T],
        fail: Fail[T],
        finished: Callable[[int], None],
    ) -> None:
        self.site = site
        try:
            with outbox_errors(f"open the outbox {path}"):
                self._outbox = Outbox(path, limits, synchronous=synchronous)
        except OutboxError as exc:
            # Whatever SQLite called it (an I/O error, most often), a file system without
            # room is what the operator has to hear about.
            free = free_bytes(Path(path))
            io_error = isinstance(exc, OutboxStorageFullError | OutboxTransientError)
            if not io_error or free is None or free >= RESERVE_BYTES:
                raise
            text = str(exc).removeprefix(FULL_PREFIX)
            raise OutboxStorageFullError(
                f"{FULL_PREFIX}{text} ({free} bytes free on its file system; the outbox "
                f"needs at least {MIN_FREE_BYTES} to run)"
            ) from exc
        self._release = release
        self._fail = fail
        self._finished = finished
        self._queue: queue.SimpleQueue[Outgoing[T] | bytes | None] = queue.SimpleQueue()
        # A full disk refuses every batch until there is room: said once per interval.
        self._full_said_at = -math.inf
        self._full_unsaid = 0

    # the outbox, read through (memory only: no SQLite call)

    @property
    def path(self) -> Path:
        return self._outbox.path

    @property
    def limits(self) -> OutboxLimits:
        return self._outbox.limits

    def __len__(self) -> int:
        return len(self._outbox)

    @property
    def total_bytes(self) -> int:
        return self._outbox.total_bytes

    def items(self) -> list[OutboxItem]:
        """Every item held, oldest first."""
        return self._outbox.items()

    def oldest_created_s(self) -> float | None:
        return self._outbox.oldest_created_s()

    # the file, with its errors mapped

    def payload(self, message_id: bytes) -> bytes | None:
        """The stored envelope (None when removed meanwhile), unchecked; raises
        :class:`OutboxError`, or :class:`~._outbox.DamagedRowError`."""
        with outbox_errors("read an item back from the outbox"):
            return self._outbox.payload(message_id)

    def envelope(self, message_id: bytes) -> bytes | DamagedRow | None:
        """The stored envelope of ``message_id``, checked before it is sent again: the
        envelope, or why its row is damaged (see :func:`envelope_damage`; a row SQLite
        itself cannot read is damaged too), or None when removed meanwhile. Raises
        :class:`OutboxError` for a failure that may pass (busy, I/O)."""
        tag = None
        item = self._outbox.get(message_id)
        if item is not None:
            tag = item.tag
        try:
            with outbox_errors("read an item back from the outbox"):
                payload = self._outbox.payload(message_id)
        except DamagedRowError as exc:
            return exc.row
        except OutboxCorruptError as exc:
            return DamagedRow(
                "blob", message_id, "bad_row", f"its record cannot be read ({exc})", tag
            )
        if payload is None:
            return None
        damage = envelope_damage(payload, message_id, self.site)
        if damage is not None:
            return DamagedRow(damage.key_type, damage.key, damage.kind, damage.reason, tag)
        return payload

    def take_damaged(self) -> list[DamagedRow]:
        """Damaged rows found in the file since the last call (memory only)."""
        return self._outbox.take_damaged()

    def quarantine(self, row: DamagedRow) -> bool:
        """Move a damaged row to the file's quarantine table (see
        :meth:`~._outbox.Outbox.quarantine`); raises :class:`OutboxError`, and the row
        then stays in the outbox, unsent, until a later start moves it."""
        with outbox_errors("move a damaged row to the outbox's quarantine"):
            return self._outbox.quarantine(row)

    def free_bytes(self) -> int | None:
        return self._outbox.free_bytes()

    def expire(self) -> list[Eviction]:
        """Evict the items older than ``max_age_s``; raises :class:`OutboxError`."""
        with outbox_errors("evict expired items from the outbox"):
            return self._outbox.expire()

    def close(self) -> None:
        with outbox_errors("close the outbox"):
            self._outbox.close()

    # the queue

    def put(self, op: Outgoing[T] | bytes) -> None:
        """Queue new items, or the id of an answered item to delete."""
        self._queue.put(op)

    def stop(self) -> None:
        """Let :meth:`run` return once what is queued before this is committed."""
        self._queue.put(None)

    # journal thread

    def run(self) -> None:
        """Commit what queues, in groups, until :meth:`stop`."""
        journal = self._queue
        last_insert = float("-inf")
        gap = math.inf  # mean time between insert transactions (moving average)
        while True:
            first = journal.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while len(ops) < _MAX_OPS:
                try:
                    more = journal.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                ops.append(more)
            outgoing = [op for op in ops if isinstance(op, Outgoing)]
            answered = [op for op in ops if isinstance(op, bytes)]
            if (
                not outgoing
                and not stop
                and gap < _BUSY_GAP_S
                and time.monotonic() - last_insert < _DELETE_WAIT_S
            ):
                stop = self.await_insert(outgoing, answered)
            if outgoing:
                now = time.monotonic()
                since = min(now - last_insert, 1.0)
                gap = since if math.isinf(gap) else 0.8 * gap + 0.2 * since
                last_insert = now
            try:
                evicted, stored = self._commit(outgoing, answered)
                self._release(outgoing, evicted, stored)
            except Exception as exc:  # a fault here must not stop every later delivery
                log.exception("site %s: the outbox journal failed", self.site)
                self._abandon(outgoing, OutboxError(f"the outbox journal failed: {exc}"))
            finally:
                self._finished(sum(len(out.entries) for out in outgoing) + len(answered))
                for out in outgoing:
                    if out.done is not None:
                        out.done.set()
            if stop:
                return

    def await_insert(self, outgoing: list[Outgoing[T]], answered: list[bytes]) -> bool:
        """Only deletes are waiting while new items keep coming: wait a little for the next
        new items, so that both share one transaction and one fsync. A delete-only commit
        would cost an fsync of its own, and new items arriving during it would queue
        behind it. Fills ``outgoing`` and ``answered``; returns whether the stop marker
        came."""
        journal = self._queue
        deadline = time.monotonic() + _DELETE_WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                op = journal.get(timeout=remaining)
            except queue.Empty:
                return False
            if op is None:
                return True
            if isinstance(op, Outgoing):
                outgoing.append(op)
                return False
            answered.append(op)

    def _abandon(self, outgoing: list[Outgoing[T]], error: OutboxError) -> None:
        """End new items with ``error`` after a fault, and take them out of the outbox, so
        that ``error`` stays their only outcome."""
        mids = [entry[0] for out in outgoing for entry in out.entries]
        try:
            with outbox_errors("take abandoned items out of the outbox"):
                self._outbox.remove_many(mids)
        except OutboxError:
            log.exception("site %s: cannot take abandoned items out of the outbox", self.site)
        self._fail(outgoing, error)

    def _commit(
        self, outgoing: list[Outgoing[T]], answered: list[bytes]
    ) -> tuple[list[Eviction], bool]:
        """Store the new entries and delete the answered items in one transaction, else
        each part on its own (see the module docstring). Returns the evictions and whether
        the new entries were stored."""
        outbox = self._outbox
        add = [entry for out in outgoing for entry in out.entries]
        remove = answered
        try:
            with outbox_errors("commit to the outbox"):
                return outbox.commit(add, remove)[0], True
        except OutboxStorageFullError:
            self._checkpoint()  # and each part on its own: the deletes make room
        except (OutboxError, OutboxFullError) as exc:
            log.warning("site %s: outbox transaction failed (%s); retrying", self.site, exc)
        if remove:
            self._retry("delete answered items", lambda: self._delete(remove), frees_space=True)
        if not add:
            return [], True
        evicted, error = self._retry("store new items", lambda: outbox.add_many(add))
        if error is None:
            return evicted or [], True
        self._fail(outgoing, refused(len(add), error))
        return [], False

    def _delete(self, remove: list[bytes]) -> None:
        """Delete answered items in one transaction; on a full disk, in transactions of
        :data:`_FULL_DELETE_STEP` items, each of whose log frames fit the space the outbox
        keeps free (the message ids are random, so each item is on a leaf page of its
        own), the log truncated between them when space runs short."""
        outbox = self._outbox
        try:
            with outbox_errors("delete answered items"):
                outbox.remove_many(remove)
        except OutboxStorageFullError:
            self._checkpoint()
            for start in range(0, len(remove), _FULL_DELETE_STEP):
                with outbox_errors("delete answered items"):
                    outbox.remove_many(remove[start : start + _FULL_DELETE_STEP])

    def _say_full(self, what: str, exc: BaseException) -> None:
        """Log a full disk at most once per :data:`_FULL_LOG_EVERY_S`, with how many
        refusals went unsaid meanwhile: every batch meets it until there is room, and
        the log may well be on the same disk."""
        now = time.monotonic()
        if now - self._full_said_at < _FULL_LOG_EVERY_S:
            self._full_unsaid += 1
            return
        unsaid, self._full_unsaid, self._full_said_at = self._full_unsaid, 0, now
        more = f" ({unsaid} more since the last such line)" if unsaid else ""
        log.warning("site %s: cannot %s: %s%s", self.site, what, exc, more)

    def _checkpoint(self) -> None:
        """Truncate the write-ahead log, so that what it held is free (best effort)."""
        try:
            with outbox_errors("checkpoint the outbox's write-ahead log"):
                self._outbox.checkpoint()
        except OutboxError as exc:
            log.warning("site %s: %s", self.site, exc)

    def _retry(
        self, what: str, fn: Callable[[], _R], *, frees_space: bool = False
    ) -> tuple[_R | None, BaseException | None]:
        """``fn()`` with a few attempts and backoff; its result, or the last error.

        A full disk is tried again only by what ``frees_space`` (deletes), after truncating
        the write-ahead log; new items are refused at once: another attempt at once would
        find no more room, and their callers should hear it now."""
        error: BaseException | None = None
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                with outbox_errors(what):
                    return fn(), None
            except (OutboxError, OutboxFullError) as exc:
                error = exc
                full = isinstance(exc, OutboxStorageFullError)
                if full:
                    self._say_full(what, exc)
                else:
                    log.exception(
                        "site %s: outbox: cannot %s (attempt %d)", self.site, what, attempt
                    )
                if isinstance(exc, OutboxFullError) or attempt == _COMMIT_ATTEMPTS:
                    break
                if full:
                    if not frees_space:
                        break
                    self._checkpoint()
                time.sleep(0.05 * attempt)
        return None, error
