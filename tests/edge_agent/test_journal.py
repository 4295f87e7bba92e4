"""The outbox journal on a real SQLite file: group commit, refusals, the wait for inserts."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from fogline.edge_agent._journal import Journal, Outgoing
from fogline.edge_agent._outbox import Eviction, OutboxLimits
from fogline.edge_agent.errors import OutboxError


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
