"""The outbox journal on a real SQLite file: group commit, refusals, the wait for inserts, a
full disk, what is checked before a re-send."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from fogline.compression import Codec, Envelope, Kind, encode_envelope
from fogline.edge_agent._journal import Journal, Outgoing
from fogline.edge_agent._outbox import DamagedRow, Eviction, OutboxLimits
from fogline.edge_agent.errors import OutboxCorruptError, OutboxError, OutboxStorageFullError
from tests.edge_agent.conftest import fill


class Recorder:
    """The journal's three callbacks, recording what they were given."""

    def __init__(self) -> None:
        self.released: list[tuple[list[bytes], list[bytes], bool]] = []
        self.failed: list[tuple[list[bytes], OutboxError]] = []
        self.finished = 0

    def release(self, outgoing: list[Outgoing[str]], evicted: list[Eviction], stored: bool) -> None:
        mids = [e[0] for out in outgoing for e in out.entries]
        self.released.append((mids, [ev.item.message_id for ev in evicted], stored))

    def fail(self, outgoing: list[Outgoing[str]], error: OutboxError) -> None:
        self.failed.append(([e[0] for out in outgoing for e in out.entries], error))

    def finish(self, n: int) -> None:
        self.finished += n


def _journal(path: Path, rec: Recorder, **limits: int) -> Journal[str]:
    return Journal(
        path,
        OutboxLimits(**limits),
        synchronous="normal",
        site="s",
        release=rec.release,
        fail=rec.fail,
        finished=rec.finish,
    )


def _mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _outgoing(*ns: int, tag: str | None = None) -> Outgoing[str]:
    out: Outgoing[str] = Outgoing(threading.Event())
    for n in ns:
        out.entries.append((_mid(n), b"payload-%d" % n, 0, tag))
        out.items.append(f"item-{n}")
    return out


def _run(journal: Journal[str]) -> None:
    journal.stop()
    journal.run()


def test_answered_items_wait_for_the_next_new_items_to_share_their_transaction(
    tmp_path: Path,
) -> None:
    journal = _journal(tmp_path / "o.db", Recorder())
    new_items = _outgoing(1)
    journal.put(_mid(9))
    journal.put(new_items)
    outgoing: list[Outgoing[str]] = []
    answered: list[bytes] = []
    assert journal.await_insert(outgoing, answered) is False
    assert outgoing == [new_items]
    assert answered == [_mid(9)]
    # Nothing new comes: it gives up and the deletes are committed alone.
    assert journal.await_insert(outgoing, answered) is False
    assert (len(outgoing), len(answered)) == (1, 1)
    # The stop marker ends the wait and is reported.
    journal.stop()
    assert journal.await_insert([], []) is True
    journal.close()


def test_new_and_answered_items_are_committed_together_and_released_once_stored(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    journal = _journal(tmp_path / "o.db", rec)
    journal.put(_outgoing(1, 2))
    _run(journal)
    assert rec.released == [([_mid(1), _mid(2)], [], True)]
    assert len(journal) == 2
    journal.put(_mid(1))  # answered
    journal.put(_outgoing(3))
    _run(journal)
    assert rec.released[-1] == ([_mid(3)], [], True)
    assert sorted(it.message_id for it in journal.items()) == [_mid(2), _mid(3)]
    assert journal.payload(_mid(3)) == b"payload-3"
    assert rec.finished == 4  # three new items and one delete
    assert rec.failed == []
    journal.close()


def test_items_the_file_refuses_fail_with_a_mapped_error_and_are_not_released(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    rec = Recorder()
    journal = _journal(path, rec)
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.tag = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    db.commit()
    db.close()
    journal.put(_outgoing(1, 2, tag="poison"))
    _run(journal)
    assert rec.released == [([_mid(1), _mid(2)], [], False)]
    [(mids, error)] = rec.failed
    assert mids == [_mid(1), _mid(2)]
    assert isinstance(error, OutboxError)
    assert "the outbox refused 2 items" in str(error)
    assert "refused by the test" in str(error)
    assert len(journal) == 0
    assert rec.finished == 2
    journal.close()


def test_a_file_that_is_not_a_database_fails_to_open_with_the_agents_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database file at all" * 100)
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        _journal(path, Recorder())


# A real small file system: what a full disk does to the journal.


def _in_file(path: Path) -> tuple[int, int]:
    """Items and payload bytes in the outbox file, read by a connection of its own."""
    db = sqlite3.connect(path)
    try:
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
    finally:
        db.close()
    return int(count), int(size)


def _big(*ns: int, size: int = 2000) -> Outgoing[str]:
    out: Outgoing[str] = Outgoing(threading.Event())
    for n in ns:
        out.entries.append((_mid(n), n.to_bytes(4, "big") * (size // 4), 0, f"tag-{n}"))
        out.items.append(f"item-{n}")
    return out


def test_a_full_file_system_refuses_new_items_as_storage_full_and_memory_equals_the_file(
    small_fs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fogline.edge_agent")
    fs = small_fs("512k")
    path = fs / "o.db"
    rec = Recorder()
    journal = _journal(path, rec)
    journal.put(_big(1, 2, 3))
    _run(journal)
    assert _in_file(path) == (3, 6000)
    filler = fill(fs, leave=0)
    for k in range(5):
        journal.put(_big(*range(10 + 10 * k, 20 + 10 * k)))
        _run(journal)
        # Whatever the file refused, memory says what the file holds.
        assert (len(journal), journal.total_bytes) == _in_file(path)
    assert len(rec.failed) == 5
    for _mids, error in rec.failed:
        assert isinstance(error, OutboxStorageFullError), error
        assert str(error).startswith("outbox storage full"), error
    # Every batch meets the full disk; the log hears of it once, not once per batch.
    said = [r for r in caplog.records if "cannot store new items" in r.getMessage()]
    assert 1 <= len(said) < 5
    assert "outbox storage full" in said[0].getMessage()
    assert len(journal) == 3  # nothing accepted earlier was lost
    assert [journal.payload(_mid(n)) for n in (1, 2, 3)] == [
        n.to_bytes(4, "big") * 500 for n in (1, 2, 3)
    ]
    # Space comes back: the next items are stored, and answered ones deleted.
    filler.unlink()
    journal.put(_mid(1))
    journal.put(_big(7))
    _run(journal)
    assert rec.released[-1] == ([_mid(7)], [], True)
    assert sorted(it.message_id for it in journal.items()) == [_mid(2), _mid(3), _mid(7)]
    assert (len(journal), journal.total_bytes) == _in_file(path) == (3, 6000)
    journal.close()


def test_on_a_512_kib_file_system_the_outbox_does_not_fill_it_by_itself(small_fs) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    rec = Recorder()
    journal = _journal(path, rec)
    # A steady flow: each round stores new items and deletes the previous round's, as
    # answers come; far more bytes pass through than the file system holds.
    for k in range(400):
        journal.put(_big(2 * k, 2 * k + 1, size=600))
        if k:
            journal.put(_mid(2 * k - 2))
            journal.put(_mid(2 * k - 1))
        _run(journal)
    assert rec.failed == []
    assert (len(journal), journal.total_bytes) == _in_file(path) == (2, 1200)
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size < 256 * 1024
    journal.close()


def test_an_outbox_that_filled_its_file_system_with_items_still_deletes_and_then_stores(
    small_fs,
) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    rec = Recorder()
    journal = _journal(path, rec)
    # The cloud is away: the backlog grows until the file system is full.
    n = 0
    while not rec.failed:
        journal.put(_big(*range(n, n + 4), size=600))
        _run(journal)
        n += 4
        assert n < 4000, "the outbox never reported a full file system"
    [(_mids, error)] = rec.failed
    assert isinstance(error, OutboxStorageFullError), error
    held = len(journal)
    assert held > 100
    assert (held, journal.total_bytes) == _in_file(path)
    # The cloud is back and answers: the deletes go through although the disk was full,
    # and the room they make takes new items again.
    for it in journal.items()[: held // 2]:
        journal.put(it.message_id)
    _run(journal)
    assert len(journal) == held - held // 2
    journal.put(_big(90_000, 90_001, size=600))
    _run(journal)
    assert rec.released[-1] == ([_mid(90_000), _mid(90_001)], [], True)
    assert len(rec.failed) == 1
    assert (len(journal), journal.total_bytes) == _in_file(path)
    journal.close()


# What is read back to be re-sent is checked first.


def _features(mid: bytes, *, site: str = "s", kind: Kind = Kind.FEATURES) -> bytes:
    env = Envelope(
        kind=kind,
        message_id=mid,
        site=site,
        bundle="tiny@1",
        tensors={"features": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)},
        meta={"relevance": 0.5},
        codec=Codec.INT8,
    )
    return encode_envelope(env, compress=False)


def _store(journal: Journal[str], entries: list[tuple[bytes, bytes]]) -> None:
    out: Outgoing[str] = Outgoing(threading.Event())
    for mid, payload in entries:
        out.entries.append((mid, payload, 0, f"tag-{mid[-1]}"))
        out.items.append("item")
    journal.put(out)
    _run(journal)


def test_a_stored_envelope_is_handed_back_only_if_it_is_this_items_own_and_intact(
    tmp_path: Path,
) -> None:
    journal = _journal(tmp_path / "o.db", Recorder())
    good = _features(_mid(1))
    flipped = bytearray(_features(_mid(2)))
    flipped[len(flipped) // 2] ^= 0x40  # one bit of the features
    _store(
        journal,
        [
            (_mid(1), good),
            (_mid(2), bytes(flipped)),
            (_mid(3), _features(_mid(99))),  # another item's envelope under this key
            (_mid(4), _features(_mid(4), site="elsewhere")),
            (_mid(5), _features(_mid(5), kind=Kind.RESULT)),
            (_mid(6), b"GARBAGE" * 10),
        ],
    )
    assert journal.envelope(_mid(1)) == good
    assert journal.envelope(_mid(42)) is None  # not (or no longer) held
    found = {n: journal.envelope(_mid(n)) for n in (2, 3, 4, 5, 6)}
    for row in found.values():
        assert isinstance(row, DamagedRow)
    assert {n: (r.kind, r.reason) for n, r in found.items() if isinstance(r, DamagedRow)} == {
        2: ("bad_envelope", "its envelope does not decode: bad_checksum: checksum mismatch"),
        3: ("wrong_item", f"its envelope names message id {_mid(99).hex()}, not its own"),
        4: ("wrong_item", "its envelope is for site 'elsewhere', not 's'"),
        5: ("wrong_item", "its envelope is a result envelope, not features"),
        6: ("bad_envelope", "its envelope does not decode: bad_magic: not a fogline envelope"),
    }
    assert found[2].tag == "tag-2"  # type: ignore[union-attr]
    journal.close()


def _overwrite(path: Path, at: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(data)


def _integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def test_attack_64_bytes_overwritten_in_the_outbox_file_are_caught_before_a_re_send(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    journal = _journal(path, Recorder())
    envelopes = {n: _features(_mid(n)) for n in (16, 32, 48)}
    _store(journal, [(_mid(n), env) for n, env in envelopes.items()])
    journal.close()  # the log is checkpointed into the file: the rows are in its pages
    raw = path.read_bytes()
    # 64 bytes inside item 16's stored features, and one bit of item 32's key (which keeps
    # the keys in order, so that SQLite's own check finds nothing).
    one = raw.index(envelopes[16])
    _overwrite(path, one + len(envelopes[16]) - 80, b"\x5a" * 64)
    two = raw.index(envelopes[32])
    assert raw[two - 16 : two] == _mid(32)  # the key is stored just before the payload
    _overwrite(path, two - 1, bytes([32 ^ 1]))
    assert _integrity(path) == "ok"  # SQLite sees nothing wrong with the file

    journal = _journal(path, Recorder())
    assert sorted(it.message_id for it in journal.items()) == sorted([_mid(16), _mid(33), _mid(48)])
    first = journal.envelope(_mid(16))
    assert isinstance(first, DamagedRow)
    assert (first.kind, first.reason.split(": ")[1]) == ("bad_envelope", "bad_checksum")
    moved = journal.envelope(_mid(33))
    assert isinstance(moved, DamagedRow)
    assert moved.kind == "wrong_item"
    assert moved.reason == f"its envelope names message id {_mid(32).hex()}, not its own"
    assert journal.envelope(_mid(48)) == envelopes[48]
    assert journal.quarantine(first) is True
    assert journal.quarantine(moved) is True
    assert [it.message_id for it in journal.items()] == [_mid(48)]
    assert (len(journal), journal.total_bytes) == _in_file(path)
    journal.close()


def test_a_damaged_file_on_a_full_disk_is_still_reported_as_damaged(small_fs) -> None:
    fs = small_fs("512k")
    path = fs / "o.db"
    path.write_bytes(b"not a database " * 400)
    fill(fs, leave=0)
    with pytest.raises(OutboxError, match="cannot open the outbox") as caught:
        _journal(path, Recorder())
    assert type(caught.value) is OutboxCorruptError, caught.value
