"""Every sqlite3 (and file-system) failure of the outbox becomes the agent's own error, in
one place: ``_journal.outbox_errors``."""

from __future__ import annotations

import errno
import re
import sqlite3
from pathlib import Path

import pytest

import fogline.edge_agent as edge_agent
from fogline.edge_agent._journal import map_outbox_error, outbox_errors
from fogline.edge_agent.errors import (
    AgentPeerError,
    OutboxCorruptError,
    OutboxError,
    OutboxStorageFullError,
    OutboxTransientError,
)


def _subclasses(cls: type[BaseException]) -> list[type[BaseException]]:
    out: list[type[BaseException]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


SQLITE_ERRORS = [sqlite3.Error, *_subclasses(sqlite3.Error)]


def test_the_enumeration_finds_every_sqlite3_exception_class() -> None:
    public = {
        obj
        for name in dir(sqlite3)
        if isinstance(obj := getattr(sqlite3, name), type) and issubclass(obj, sqlite3.Error)
    }
    assert public <= set(SQLITE_ERRORS)
    assert len(SQLITE_ERRORS) >= 9  # Error, InterfaceError, DatabaseError and its six


@pytest.mark.parametrize("cls", SQLITE_ERRORS, ids=lambda c: c.__name__)
def test_every_sqlite3_exception_becomes_an_outbox_error_raised_from_it(
    cls: type[sqlite3.Error],
) -> None:
    upstream = cls("upstream says no")
    with pytest.raises(OutboxError) as caught, outbox_errors("store new items"):
        raise upstream
    assert caught.value.__cause__ is upstream
    assert str(caught.value) == "cannot store new items: upstream says no"
    assert isinstance(caught.value, AgentPeerError)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (sqlite3.SQLITE_FULL, OutboxStorageFullError),
        (sqlite3.SQLITE_IOERR_SHMSIZE, OutboxStorageFullError),  # -shm cannot grow: a full disk
        (sqlite3.SQLITE_CORRUPT, OutboxCorruptError),
        (sqlite3.SQLITE_NOTADB, OutboxCorruptError),
        (sqlite3.SQLITE_CORRUPT_INDEX, OutboxCorruptError),  # an extended code
        (sqlite3.SQLITE_BUSY, OutboxTransientError),
        (sqlite3.SQLITE_BUSY_SNAPSHOT, OutboxTransientError),
        (sqlite3.SQLITE_LOCKED, OutboxTransientError),
        (sqlite3.SQLITE_IOERR, OutboxTransientError),
        (sqlite3.SQLITE_IOERR_WRITE, OutboxTransientError),
        (sqlite3.SQLITE_CANTOPEN, OutboxTransientError),
        (sqlite3.SQLITE_CONSTRAINT, OutboxError),
        (sqlite3.SQLITE_READONLY, OutboxError),
    ],
)
@pytest.mark.parametrize("cls", SQLITE_ERRORS, ids=lambda c: c.__name__)
def test_the_sqlite_result_code_decides_the_kind_whatever_the_class(
    cls: type[sqlite3.Error], code: int, kind: type[OutboxError]
) -> None:
    upstream = cls("coded")
    upstream.sqlite_errorcode = code  # type: ignore[attr-defined]
    assert type(map_outbox_error(upstream, "commit")) is kind


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (sqlite3.OperationalError, OutboxTransientError),
        (sqlite3.DatabaseError, OutboxCorruptError),
        (sqlite3.IntegrityError, OutboxError),
        (sqlite3.ProgrammingError, OutboxError),
        (sqlite3.InterfaceError, OutboxError),
    ],
)
def test_without_a_result_code_the_class_decides_the_kind(
    cls: type[sqlite3.Error], kind: type[OutboxError]
) -> None:
    assert type(map_outbox_error(cls("uncoded"), "commit")) is kind


def test_a_full_disk_says_outbox_storage_full_first() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert str(map_outbox_error(full, "commit")) == (
        "outbox storage full: cannot commit: database or disk is full"
    )
    no_space = OSError(errno.ENOSPC, "No space left on device")
    assert str(map_outbox_error(no_space, "write")).startswith("outbox storage full: cannot write")


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (errno.ENOSPC, OutboxStorageFullError),
        (errno.EDQUOT, OutboxStorageFullError),
        (errno.EIO, OutboxTransientError),
        (errno.EACCES, OutboxError),
        (None, OutboxError),
    ],
)
def test_file_system_errors_become_outbox_errors_too(err: int | None, kind: type) -> None:
    upstream = OSError(err, "file system says no") if err is not None else OSError("no")
    with pytest.raises(OutboxError) as caught, outbox_errors("open the outbox x"):
        raise upstream
    assert type(caught.value) is kind
    assert caught.value.__cause__ is upstream


def test_anything_else_passes_through_unmapped() -> None:
    with pytest.raises(KeyError), outbox_errors("commit"):
        raise KeyError("a bug, not an outbox failure")
    with pytest.raises(TypeError):
        map_outbox_error(KeyError("x"), "commit")


def test_a_real_damaged_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    from fogline.edge_agent._outbox import Outbox

    path = tmp_path / "o.db"
    path.write_bytes(b"not a database " * 400)
    with (
        pytest.raises(OutboxCorruptError, match="cannot open the outbox"),
        outbox_errors(f"open the outbox {path}"),
    ):
        Outbox(path)


def test_no_other_module_of_the_agent_catches_sqlite3_errors() -> None:
    root = Path(edge_agent.__file__).parent
    catching = re.compile(r"except\b[^:]*sqlite3")
    offenders = [
        f.name
        for f in root.glob("*.py")
        if f.name != "_journal.py" and catching.search(f.read_text())
    ]
    assert offenders == []
