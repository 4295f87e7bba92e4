"""The durable outbox on real SQLite files: recovery, bounds, eviction order, kill -9."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from fogline.edge_agent import OutboxInUseError, OutboxStorageFullError
from fogline.edge_agent._outbox import (
    QUARANTINE_KEEP,
    RESERVE_BYTES,
    DamagedRow,
    DamagedRowError,
    Eviction,
    Outbox,
    OutboxFullError,
    OutboxItem,
    OutboxLimits,
)
from tests.edge_agent.conftest import fill, free_bytes


def _mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _ids(items: Iterable[OutboxItem]) -> list[int]:
    return [int.from_bytes(it.message_id, "big") for it in items]


def _evicted(evictions: Iterable[Eviction]) -> list[tuple[int, str]]:
    """Evictions as (item number, reason), in the order the outbox made them."""
    return [(int.from_bytes(e.item.message_id, "big"), e.reason) for e in evictions]


def test_items_survive_reopening_with_their_tags_priorities_and_payloads(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), b"one", 0, "tag-1"), (_mid(2), b"two!", 5, None)], now_s=100.0)
    box.add_many([(_mid(3), b"three", -2, "tag-3")], now_s=200.0)
    box.close()

    again = Outbox(path)
    assert len(again) == 3
    assert again.total_bytes == len(b"one") + len(b"two!") + len(b"three")
    assert _ids(again.items()) == [1, 2, 3]  # oldest first
    assert [again.get(_mid(n)) for n in (1, 2, 3)] == [
        OutboxItem(_mid(1), 3, 0, 100.0, "tag-1"),
        OutboxItem(_mid(2), 4, 5, 100.0, None),
        OutboxItem(_mid(3), 5, -2, 200.0, "tag-3"),
    ]
    assert again.payload(_mid(3)) == b"three"
    assert _mid(2) in again
    assert again.oldest_created_s() == 100.0
    again.close()


def test_the_outbox_file_and_its_wal_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), b"site data", 0, None)])
    files = [path, *path.parent.glob("outbox.db-*")]
    assert any(f.name.endswith("-wal") for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    box.close()


def test_remove_many_deletes_only_what_is_held_and_returns_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(n), bytes(10 * n), 0, f"t{n}") for n in (1, 2, 3)])
    removed = box.remove_many([_mid(1), _mid(3), _mid(99)])
    assert sorted(_ids(removed)) == [1, 3]
    assert box.remove_many([_mid(1)]) == []  # already gone
    assert box.remove_many([]) == []
    assert len(box) == 1
    assert box.total_bytes == 20
    assert box.payload(_mid(1)) is None
    box.close()
    again = Outbox(path)
    assert _ids(again.items()) == [2]
    again.close()


def test_max_items_evicts_the_lowest_priority_first_then_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, OutboxLimits(max_items=3))
    assert box.add_many([(_mid(1), b"a", 0, None)], now_s=1.0) == []
    assert box.add_many([(_mid(2), b"b", 1, None)], now_s=2.0) == []
    assert box.add_many([(_mid(3), b"c", 0, None)], now_s=3.0) == []
    # Full: the oldest of the lowest priority goes, not the oldest overall.
    assert _evicted(box.add_many([(_mid(4), b"d", 1, None)], now_s=4.0)) == [(1, "max_items")]
    assert _evicted(box.add_many([(_mid(5), b"e", 0, None)], now_s=5.0)) == [(3, "max_items")]
    # A new item that ranks lowest is itself evicted and never stored.
    assert _evicted(box.add_many([(_mid(6), b"f", -1, None)], now_s=6.0)) == [(6, "max_items")]
    assert sorted(_ids(box.items())) == [2, 4, 5]
    box.close()
    again = Outbox(path, OutboxLimits(max_items=3))
    assert sorted(_ids(again.items())) == [2, 4, 5]
    again.close()


def test_within_one_batch_the_earlier_entries_count_as_older(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", OutboxLimits(max_items=2))
    evicted = box.add_many([(_mid(n), b"x", 0, None) for n in (1, 2, 3, 4)], now_s=1.0)
    assert _evicted(evicted) == [(1, "max_items"), (2, "max_items")]
    assert sorted(_ids(box.items())) == [3, 4]
    box.close()


def test_max_bytes_evicts_until_the_payloads_fit(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, OutboxLimits(max_bytes=100))
    box.add_many([(_mid(1), bytes(40), 0, None)], now_s=1.0)
    box.add_many([(_mid(2), bytes(40), 5, None)], now_s=2.0)
    box.add_many([(_mid(3), bytes(10), 0, None)], now_s=3.0)
    # 90 held and 60 more: both priority-0 items go (oldest first), the older
    # priority-5 one stays.
    evicted = box.add_many([(_mid(4), bytes(60), 5, None)], now_s=4.0)
    assert _evicted(evicted) == [(1, "max_bytes"), (3, "max_bytes")]
    assert box.total_bytes == 100
    assert sorted(_ids(box.items())) == [2, 4]
    box.close()
    again = Outbox(path, OutboxLimits(max_bytes=100))
    assert again.total_bytes == 100
    again.close()


def test_max_age_expires_items_older_than_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, OutboxLimits(max_age_s=60.0))
    box.add_many([(_mid(1), b"old", 9, "o")], now_s=1000.0)
    box.add_many([(_mid(2), b"new", 0, "n")], now_s=1030.0)
    assert box.expire(now_s=1060.0) == []  # exactly at the bound: still young enough
    expired = box.expire(now_s=1060.5)
    assert _evicted(expired) == [(1, "max_age")]
    assert expired[0].item.tag == "o"
    assert _ids(box.items()) == [2]
    assert _evicted(box.expire(now_s=2000.0)) == [(2, "max_age")]
    assert len(box) == 0
    assert box.oldest_created_s() is None
    box.close()
    again = Outbox(path)
    assert len(again) == 0
    again.close()


def test_an_item_larger_than_max_bytes_is_refused_and_nothing_of_its_batch_is_stored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, OutboxLimits(max_bytes=100))
    box.add_many([(_mid(1), bytes(30), 0, None)])
    with pytest.raises(OutboxFullError, match="101 bytes exceeds the outbox bound of 100"):
        box.add_many([(_mid(2), bytes(10), 0, None), (_mid(3), bytes(101), 0, None)])
    assert _ids(box.items()) == [1]
    assert box.total_bytes == 30
    box.close()
    again = Outbox(path)
    assert _ids(again.items()) == [1]
    again.close()


def test_message_ids_must_be_sixteen_bytes(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    with pytest.raises(ValueError, match="16 bytes"):
        box.add_many([(b"short", b"x", 0, None)])
    assert len(box) == 0
    box.close()


def test_adding_an_id_again_replaces_the_stored_item(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), bytes(50), 0, "first")], now_s=1.0)
    box.add_many([(_mid(1), b"second", 3, "second")], now_s=2.0)
    assert len(box) == 1
    assert box.total_bytes == len(b"second")
    assert box.payload(_mid(1)) == b"second"
    box.close()
    again = Outbox(path)
    item = again.get(_mid(1))
    assert item is not None
    assert (item.tag, item.priority, item.size, item.created_s) == ("second", 3, 6, 2.0)
    again.close()


def test_a_re_added_item_that_is_evicted_at_once_leaves_nothing_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    limits = OutboxLimits(max_items=2)
    box = Outbox(path, limits)
    box.add_many([(_mid(1), b"a", 5, None), (_mid(2), b"b", 5, None)], now_s=1.0)
    evicted = box.add_many([(_mid(1), b"a2", 0, None), (_mid(3), b"c", 5, None)], now_s=2.0)
    assert _evicted(evicted) == [(1, "max_items")]
    assert sorted(_ids(box.items())) == [2, 3]
    box.close()
    again = Outbox(path, limits)
    assert sorted(_ids(again.items())) == [2, 3]
    again.close()


def test_one_commit_deletes_the_answered_items_first_so_they_make_room_for_the_new(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    limits = OutboxLimits(max_items=2)
    box = Outbox(path, limits)
    box.add_many([(_mid(1), b"a", 0, None), (_mid(2), b"b", 0, None)], now_s=1.0)
    evicted, removed = box.commit([(_mid(3), b"c", 0, None)], [_mid(1), _mid(99)], now_s=2.0)
    assert evicted == []
    assert _ids(removed) == [1]
    assert sorted(_ids(box.items())) == [2, 3]
    assert box.total_bytes == 2
    box.close()
    again = Outbox(path, limits)
    assert sorted(_ids(again.items())) == [2, 3]
    again.close()


def test_a_failed_commit_leaves_memory_and_file_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    limits = OutboxLimits(max_items=2)
    box = Outbox(path, limits)
    box.add_many([(_mid(1), b"one", 0, None), (_mid(2), b"two", 5, None)], now_s=1.0)
    # Another connection makes the file refuse one tag, as a full disk or a fault would.
    other = sqlite3.connect(path)
    other.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.tag = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    other.commit()
    other.close()
    with pytest.raises(sqlite3.IntegrityError, match="refused by the test"):
        # removes 2, stores 3 and 4, evicts 1 (lowest priority) for room: all undone
        box.commit([(_mid(3), b"x", 9, None), (_mid(4), b"y", 9, "poison")], [_mid(2)])
    assert sorted(_ids(box.items())) == [1, 2]
    assert box.total_bytes == 6
    assert box.payload(_mid(2)) == b"two"
    # The memory mirror still drives eviction correctly afterwards.
    evicted = box.add_many([(_mid(5), b"z", 9, None)], now_s=3.0)
    assert _evicted(evicted) == [(1, "max_items")]
    box.close()
    again = Outbox(path, limits)
    assert sorted(_ids(again.items())) == [2, 5]
    again.close()


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"max_items": 0}, "max_items must be at least 1"),
        ({"max_bytes": 0}, "max_bytes must be at least 1"),
        ({"max_age_s": 0.0}, "max_age_s must be positive"),
    ],
)
def test_impossible_bounds_are_refused(kwargs: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        OutboxLimits(**kwargs)  # type: ignore[arg-type]


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be 'full' or 'normal'"):
        Outbox(tmp_path / "outbox.db", synchronous="off")  # type: ignore[arg-type]


_WRITER = """
import sys, time
from fogline.edge_agent._outbox import Outbox

path, n = sys.argv[1], int(sys.argv[2])
box = Outbox(path)
for start in range(0, n, 50):
    box.add_many([
        (i.to_bytes(16, "big"), bytes([i % 251]) * (100 + i), i % 3, f"tag-{i}")
        for i in range(start, min(n, start + 50))
    ])
print("done", flush=True)
time.sleep(600)
"""


def _wait_for_line(proc: subprocess.Popen[str], expected: str, timeout_s: float = 60.0) -> str:
    """The first stdout line of ``proc``; fails if it is not ``expected`` in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"the child printed nothing within {timeout_s} s")
    line = proc.stdout.readline().strip()
    if not line.startswith(expected):
        proc.wait(10)
        raise AssertionError(f"the child printed {line!r} and exited with {proc.returncode}")
    return line


def _kill_9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_a_process_killed_right_after_add_many_keeps_every_item(
    tmp_path: Path, synchronous: str
) -> None:
    path = tmp_path / "outbox.db"
    n = 240
    script = _WRITER.replace("Outbox(path)", f"Outbox(path, synchronous={synchronous!r})")
    stderr = (tmp_path / "child.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(n)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        _wait_for_line(proc, "done")
        _kill_9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()

    box = Outbox(path)
    assert len(box) == n
    assert sorted(_ids(box.items())) == list(range(n))
    for i in (0, 77, n - 1):
        item = box.get(_mid(i))
        assert item is not None
        assert (item.tag, item.priority, item.size) == (f"tag-{i}", i % 3, 100 + i)
        assert box.payload(_mid(i)) == bytes([i % 251]) * (100 + i)
    assert box.total_bytes == sum(100 + i for i in range(n))
    box.close()


class _CommitFailsAfterRollingBack:
    """The outbox's connection, except that COMMIT fails the way SQLite's does on a full
    disk: the transaction is rolled back already when the error comes. Staged, so that the
    order (rolled back, then the error) is certain whatever SQLite version runs; the test
    on a real full file system is below."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def execute(self, sql: str, *args: object) -> object:
        if sql == "COMMIT":
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, rows: object) -> object:
        return self._db.executemany(sql, rows)  # type: ignore[arg-type]

    def close(self) -> None:
        self._db.close()


def test_a_commit_that_failed_and_rolled_back_reports_its_own_error_and_memory_follows_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), b"kept", 0, None)])
    real = box._db
    box._db = _CommitFailsAfterRollingBack(real)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        box.commit([(_mid(2), b"new", 0, None)], [_mid(1)])
    box._db = real
    assert _ids(box.items()) == [1]  # as before the failed transaction
    assert box.total_bytes == 4
    box.close()
    assert _ids(Outbox(path).items()) == [1]


def test_a_second_outbox_on_the_same_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    first = Outbox(path)
    with pytest.raises(OutboxInUseError, match=rf"outbox {path} is in use by another agent"):
        Outbox(path)
    first.close()
    again = Outbox(path)
    again.close()


def test_another_process_holding_the_outbox_is_named_and_its_death_frees_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_for_line(proc, "done")
        with pytest.raises(OutboxInUseError, match=rf"another agent \(pid {proc.pid}\)"):
            Outbox(path)
        _kill_9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A killed agent leaves no stale lock behind: the next one starts on its items.
    box = Outbox(path)
    assert len(box) == 1
    box.close()


def _in_file(path: Path) -> tuple[list[int], int]:
    """Item numbers and payload bytes in the outbox file, read by a connection of its own."""
    db = sqlite3.connect(path)
    try:
        ids = [int.from_bytes(r[0], "big") for r in db.execute("SELECT message_id FROM outbox")]
        (size,) = db.execute("SELECT coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
    finally:
        db.close()
    return sorted(ids), int(size)


def test_a_commit_a_full_file_system_fails_leaves_memory_equal_to_the_file(
    small_fs, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    limits = OutboxLimits(max_items=3)
    box = Outbox(path, limits, synchronous="normal")
    box.add_many([(_mid(n), bytes([n]) * 1000, n, None) for n in (1, 2, 3)], now_s=1.0)
    # The outbox's own look at the free space is switched off: SQLite meets the full disk
    # itself, at COMMIT, which has rolled back when it fails.
    monkeypatch.setattr(Outbox, "_make_room", lambda self, incoming: None)
    filler = fill(fs, leave=0)
    for k in range(3):
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            # removes 3, stores 40 large ones, evicts 1 and 2 (lowest priority): all undone
            box.commit(
                [(_mid(100 + 40 * k + i), b"x" * 4000, 9, None) for i in range(40)], [_mid(3)]
            )
        assert (sorted(_ids(box.items())), box.total_bytes) == _in_file(path) == ([1, 2, 3], 3000)
    # Space comes back, and the mirror still drives eviction: the lowest priority goes.
    filler.unlink()
    assert _evicted(box.add_many([(_mid(9), b"z", 9, None)], now_s=2.0)) == [(1, "max_items")]
    assert (sorted(_ids(box.items())), box.total_bytes) == _in_file(path) == ([2, 3, 9], 2001)
    box.close()


def test_on_a_512_kib_file_system_the_log_is_truncated_before_it_fills_the_disk(small_fs) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    box = Outbox(path, synchronous="normal")
    wal = path.with_name(path.name + "-wal")
    largest = 0
    # Far more bytes than the file system holds pass through: stored, then answered.
    for k in range(1, 1500):
        box.commit([(_mid(k), bytes([k % 251]) * 600, 0, None)], [_mid(k - 1)])
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    assert (sorted(_ids(box.items())), box.total_bytes) == _in_file(path) == ([1499], 600)
    assert largest < 512 * 1024 - RESERVE_BYTES
    box.close()


def test_new_items_are_refused_before_the_reserve_for_deletes_is_used_up(small_fs) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    box = Outbox(path, synchronous="normal")
    n, refusal = 0, None
    while refusal is None and n < 5000:
        try:
            box.add_many([(_mid(n), bytes([n % 251]) * 600, 0, None)])
            n += 1
        except OutboxStorageFullError as exc:
            refusal = exc
    assert refusal is not None, "a 512 KiB file system took 3 MB"
    assert str(refusal).startswith("outbox storage full: ")
    assert "so that answered items can still be deleted" in str(refusal)
    assert free_bytes(fs) >= RESERVE_BYTES - 4096
    assert (len(box), box.total_bytes) == (n, 600 * n)
    # Every item can still be deleted, one transaction at a time as answers come.
    for k in range(n):
        box.remove_many([_mid(k)])
    assert _in_file(path) == ([], 0)
    box.close()


# Damaged rows: what a damaged file, or one written by something else, holds.


def _write(path: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def _quarantined(path: Path) -> list[tuple[object, str]]:
    db = sqlite3.connect(path)
    db.text_factory = bytes
    try:
        rows = db.execute("SELECT message_id, reason FROM quarantine ORDER BY rowid").fetchall()
    finally:
        db.close()
    return [(key, reason.decode()) for key, reason in rows]


BAD_ROWS = [
    (
        "its message id is text, not a blob",
        "x'00'",
        "'0123456789abcdef'",
        "x'aa'",
        "0",
        "1.0",
        "NULL",
    ),
    ("its message id is 3 bytes, not 16", "x'00'", "x'010203'", "x'aa'", "0", "1.0", "NULL"),
    ("its message id is integer, not a blob", "x'00'", "42", "x'aa'", "0", "1.0", "NULL"),
    ("its payload is text, not a blob", "x'01'", None, "'an envelope?'", "0", "1.0", "NULL"),
    ("its payload is integer, not a blob", "x'02'", None, "1000000000", "0", "1.0", "NULL"),
    ("its payload is empty", "x'03'", None, "x''", "0", "1.0", "NULL"),
    ("its priority is text, not an integer", "x'04'", None, "x'aa'", "'high'", "1.0", "NULL"),
    ("its priority is real, not an integer", "x'05'", None, "x'aa'", "1.5", "1.0", "NULL"),
    ("its creation time is text", "x'06'", None, "x'aa'", "0", "'yesterday'", "NULL"),
    ("its tag is blob, not text", "x'07'", None, "x'aa'", "0", "1.0", "x'ff00'"),
    ("its tag is not UTF-8 text", "x'08'", None, "x'aa'", "0", "1.0", "CAST(x'ff' AS TEXT)"),
]


@pytest.mark.parametrize(
    ("problem", "n", "key", "payload", "priority", "created", "tag"),
    BAD_ROWS,
    ids=[row[0] for row in BAD_ROWS],
)
def test_attack_a_row_of_the_wrong_type_or_length_is_set_aside_at_open_and_the_rest_kept(
    tmp_path: Path,
    problem: str,
    n: str,
    key: str | None,
    payload: str,
    priority: str,
    created: str,
    tag: str,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), b"one", 0, "t1"), (_mid(2), b"two", 0, None)], now_s=5.0)
    box.close()
    key_sql = key if key is not None else f"x'{'ff' * 15}{n[2:4]}'"  # a good 16-byte id
    _write(
        path,
        "INSERT INTO outbox (message_id, payload, priority, created_s, tag)"
        f" VALUES ({key_sql}, {payload}, {priority}, {created}, {tag})",
    )

    box = Outbox(path)
    assert sorted(_ids(box.items())) == [1, 2]
    assert (len(box), box.total_bytes) == (2, 6)
    [row] = box.take_damaged()
    assert box.take_damaged() == []  # reported once
    assert row.kind == "bad_row"
    assert row.reason.startswith(problem), row.reason
    assert box.damaged() == [row]
    assert box.quarantine(row) is True
    assert box.damaged() == []
    assert box.payload(_mid(1)) == b"one"  # the others are untouched
    box.close()
    [(_key, reason)] = _quarantined(path)
    assert reason == f"bad_row: {row.reason}"
    again = Outbox(path)
    assert again.take_damaged() == []
    assert sorted(_ids(again.items())) == [1, 2]
    again.close()


def test_attack_null_columns_in_a_table_made_by_something_else_are_set_aside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    # The table exists already, without the outbox's constraints: CREATE IF NOT EXISTS
    # keeps it, NULLs and all.
    _write(path, "CREATE TABLE outbox (message_id, payload, priority, created_s, tag)")
    for sql in (
        "INSERT INTO outbox VALUES (NULL, x'aa', 0, 1.0, NULL)",
        f"INSERT INTO outbox VALUES (x'{'00' * 16}', NULL, 0, 1.0, NULL)",
        f"INSERT INTO outbox VALUES (x'{'00' * 15}01', x'aa', NULL, 1.0, NULL)",
        f"INSERT INTO outbox VALUES (x'{'00' * 15}02', x'aa', 0, NULL, NULL)",
        f"INSERT INTO outbox VALUES (x'{'00' * 15}03', x'aa', 0, 1.0, 't')",
    ):
        _write(path, sql)
    box = Outbox(path)
    assert _ids(box.items()) == [3]
    damaged = box.take_damaged()
    assert sorted(row.reason for row in damaged) == [
        "its creation time is null, not a number of seconds",
        "its message id is null, not a blob",
        "its payload is null, not a blob",
        "its priority is null, not an integer",
    ]
    for row in damaged:
        assert box.quarantine(row) is True
    box.close()
    assert len(_quarantined(path)) == 4
    assert _in_file(path) == ([3], 1)


def test_a_payload_changed_in_the_file_is_refused_when_it_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(n), b"payload-%d" % n, 0, f"t{n}") for n in (1, 2, 3)])
    _write(path, "UPDATE outbox SET payload = 'text now' WHERE message_id = ?", _mid(1))
    _write(path, "UPDATE outbox SET payload = x'0102' WHERE message_id = ?", _mid(2))
    with pytest.raises(DamagedRowError, match="its payload is text, not a blob") as first:
        box.payload(_mid(1))
    assert (first.value.row.message_id, first.value.row.tag) == (_mid(1), "t1")
    with pytest.raises(DamagedRowError, match="its payload is 2 bytes, 9 when it was stored"):
        box.payload(_mid(2))
    assert box.payload(_mid(3)) == b"payload-3"
    assert box.quarantine(first.value.row) is True
    assert sorted(_ids(box.items())) == [2, 3]
    assert (len(box), box.total_bytes) == (2, 18)
    box.close()


def test_the_quarantine_table_keeps_the_latest_rows_only(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    n = QUARANTINE_KEEP + 5
    box.add_many([(_mid(k), b"x", 0, None) for k in range(n)])
    for k in range(n):
        box.quarantine(DamagedRow("blob", _mid(k), "bad_envelope", f"damage {k}"))
    box.close()
    kept = _quarantined(path)
    assert len(kept) == QUARANTINE_KEEP
    assert kept[-1][1] == f"bad_envelope: damage {n - 1}"
    assert kept[0][1] == "bad_envelope: damage 5"


def test_a_damaged_row_found_when_memory_is_read_back_after_a_failure_is_reported(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.add_many([(_mid(1), b"one", 0, None)])
    _write(path, "INSERT INTO outbox VALUES (x'0102', x'aa', 0, 1.0, NULL)")
    _write(
        path,
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.tag = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    with pytest.raises(sqlite3.IntegrityError, match="refused by the test"):
        box.add_many([(_mid(2), b"two", 0, "poison")])
    [row] = box.take_damaged()
    assert (row.key_type, row.key, row.reason) == (
        "blob",
        b"\x01\x02",
        "its message id is 2 bytes, not 16",
    )
    assert (sorted(_ids(box.items())), box.total_bytes) == ([1], 3)
    box.close()
