"""The result store on real SQLite, and on PostgreSQL when FOGLINE_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fogline.cloud_service import ConfigError, ResultStore, StoredResult

POSTGRES_URL = os.environ.get("FOGLINE_TEST_POSTGRES_URL")


def result(site: str = "site-a", *, label: int = 3, worker: str = "w1") -> StoredResult:
    return StoredResult(
        site=site,
        message_id=uuid.uuid4().hex,
        bundle="tiny@1",
        label=label,
        confidence=0.875,
        output=(0.0625, 0.0, 0.0625, 0.875),
        worker=worker,
        created_us=1_700_000_000_000_000,
        received_us=1_700_000_000_001_000,
        completed_us=1_700_000_000_002_500,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    """A store in a fresh SQLite file, or in a table of its own on PostgreSQL."""
    if request.param == "sqlite":
        s = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
        yield s
        s.close()
        return
    if not POSTGRES_URL:
        pytest.skip("FOGLINE_TEST_POSTGRES_URL is not set")
    table = f"fogline_results_test_{uuid.uuid4().hex[:12]}"
    s = ResultStore(POSTGRES_URL, table_name=table)
    try:
        yield s
    finally:
        s.table.drop(s.engine, checkfirst=True)
        s.close()


def test_a_stored_result_reads_back_whole(store: ResultStore) -> None:
    r = result()
    store.put_many([r, result("site-b")])
    assert store.get(r.site, r.message_id) == r
    assert store.count() == 2


def test_a_result_is_found_by_hex_uuid_or_raw_id(store: ResultStore) -> None:
    r = result()
    store.put_many([r])
    raw = bytes.fromhex(r.message_id)
    assert store.get(r.site, str(uuid.UUID(bytes=raw))) == r
    assert store.get(r.site, raw) == r
    assert store.get(r.site, r.message_id.upper()) == r


def test_storing_the_same_key_again_keeps_the_first_answer(store: ResultStore) -> None:
    first = result(label=1, worker="w1")
    again = StoredResult(**{**first.__dict__, "label": 2, "worker": "w2"})
    store.put_many([first])
    store.put_many([again, result()])
    # Nothing is written back afterwards: a store that overwrote would now hold `again`.
    assert store.get(first.site, first.message_id) == first
    assert store.count() == 2


def test_duplicates_inside_one_batch_keep_the_first_of_the_batch(store: ResultStore) -> None:
    first = result(label=1, worker="w1")
    later = StoredResult(**{**first.__dict__, "label": 2, "worker": "w2"})
    store.put_many([first, later])
    stored = store.get(first.site, first.message_id)
    assert stored is not None
    # Which of two racing answers wins is not promised, but exactly one is kept whole.
    assert stored in (first, later)
    assert store.count() == 1


def test_the_same_id_from_two_sites_is_two_results(store: ResultStore) -> None:
    a = result("site-a")
    b = StoredResult(**{**a.__dict__, "site": "site-b", "label": 0})
    store.put_many([a, b])
    assert store.get("site-a", a.message_id) == a
    assert store.get("site-b", a.message_id) == b


def test_an_absent_result_is_none_and_a_malformed_id_is_refused(store: ResultStore) -> None:
    assert store.get("site-a", uuid.uuid4().hex) is None
    with pytest.raises(ValueError, match="not a UUID"):
        store.get("site-a", "not-an-id")


def test_concurrent_writers_with_overlapping_keys_all_succeed(store: ResultStore) -> None:
    shared = [result() for _ in range(20)]
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(5):
                store.put_many([*shared[i * 4 : i * 4 + 4], result(f"s{n}")])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count() == 20 + 4 * 5


def test_sqlite_runs_in_wal_mode_so_readers_do_not_block_the_writer(tmp_path: Path) -> None:
    s = ResultStore(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
    finally:
        s.close()


def test_two_stores_on_one_sqlite_file_see_each_others_results(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    writer, reader = ResultStore(url), ResultStore(url)
    try:
        r = result()
        writer.put_many([r])
        assert reader.get(r.site, r.message_id) == r
    finally:
        writer.close()
        reader.close()


def test_a_worker_starting_while_another_creates_the_table_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    create = sa.Table.create

    def raced(table: sa.Table, bind: sa.engine.Engine, checkfirst: bool = False) -> None:
        create(table, bind, checkfirst=False)  # another worker, just after this one's check
        create(table, bind, checkfirst=False)  # this one's CREATE: "already exists"

    monkeypatch.setattr(sa.Table, "create", raced)
    store = ResultStore(url)
    monkeypatch.undo()
    r = result("site-a")
    store.put_many([r])
    assert store.get("site-a", r.message_id) is not None
    store.close()


def test_an_in_memory_sqlite_store_is_shared_across_threads() -> None:
    s = ResultStore("sqlite://")
    r = result()
    t = threading.Thread(target=s.put_many, args=([r],))
    t.start()
    t.join()
    assert s.get(r.site, r.message_id) == r
    s.close()


def test_an_unusable_store_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="store URL"):
        ResultStore("nosuchdb+driver://x/y")
    with pytest.raises(ConfigError, match="store URL"):
        ResultStore("::::")


def test_the_results_table_has_the_documented_columns(tmp_path: Path) -> None:
    s = ResultStore(f"sqlite:///{tmp_path / 'cols.db'}")
    try:
        cols = {c["name"] for c in sa.inspect(s.engine).get_columns("fogline_results")}
    finally:
        s.close()
    assert cols == {
        "site",
        "message_id",
        "bundle",
        "label",
        "confidence",
        "output",
        "worker",
        "created_us",
        "received_us",
        "completed_us",
    }


def test_several_results_are_looked_up_in_one_call_by_site_and_id(store: ResultStore) -> None:
    a, b = result("site-a"), result("site-b")
    store.put_many([a, b])
    missing = uuid.uuid4().bytes
    found = store.get_many(
        [("site-a", bytes.fromhex(a.message_id)), ("site-b", b.message_id), ("site-a", missing)]
    )
    assert found == {("site-a", a.message_id): a, ("site-b", b.message_id): b}
    # The same id under another site is another item.
    assert store.get_many([("site-c", a.message_id)]) == {}
    assert store.get_many([]) == {}
