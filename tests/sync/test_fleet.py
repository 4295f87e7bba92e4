"""The fleet store on real SQLite, and on PostgreSQL when FOGLINE_TEST_POSTGRES_URL is set:
the same behaviour on both."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from fogline.sync import RolloutError, StatusReport, StorageError
from fogline.sync._fleet import PREFIX, FleetStore, StaleRolloutError
from fogline.sync._rollout import Rollout, RolloutPolicy

POSTGRES_URL = os.environ.get("FOGLINE_TEST_POSTGRES_URL")


def key(n: int) -> dict[str, object]:
    return {
        "keyid": f"{n:064x}",
        "keytype": "ed25519",
        "scheme": "ed25519",
        "keyval": {"public": f"{n:064x}"},
    }


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    """A fleet store in a fresh SQLite file, or in a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        s = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
        yield s
        s.close()
        return
    if not POSTGRES_URL:
        pytest.skip("FOGLINE_TEST_POSTGRES_URL is not set")
    schema = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    s = FleetStore(url.render_as_string(hide_password=False))
    try:
        yield s
    finally:
        s.close()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def test_every_table_is_prefixed(store: FleetStore) -> None:
    names = set(sa.inspect(store.engine).get_table_names())
    assert {t.name for t in store.t.values()} <= names
    assert all(t.name.startswith(PREFIX) for t in store.t.values())


def test_registering_a_site_twice_is_idempotent_and_moves_it(store: FleetStore) -> None:
    assert store.register_sites([("a", "eu", "f1", key(1))], 10.0) == 1
    assert store.register_sites([("a", "eu", "f1", key(1))], 11.0) == 0
    store.register_sites([("a", "us", "f2", key(1))], 12.0)
    got = store.site("a")
    assert got is not None
    assert (got.region, got.fleet, got.registered_at) == ("us", "f2", 10.0)


def test_attack_registering_a_site_again_with_another_key_is_refused(store: FleetStore) -> None:
    store.register_sites([("a", "eu", "f", key(1))], 10.0)
    with pytest.raises(RolloutError, match="another key"):
        store.register_sites([("a", "eu", "f", key(2))], 11.0)
    assert store.public_key("a") == key(1)


def test_ten_thousand_sites_register_and_report_in_bulk(store: FleetStore) -> None:
    n = 10_000
    assert store.register_sites([(f"s{i}", "eu", "big", key(i)) for i in range(n)], 1.0) == n
    reports = [
        StatusReport(
            site=f"s{i}", nonce="x", bundle="m@1", phase="active", health={"error_rate": 0.01}
        )
        for i in range(n)
    ]
    store.record_reports(reports, 2.0)
    sites = store.sites("big")
    assert len(sites) == n
    assert {(s.bundle, s.last_seen, s.health["error_rate"]) for s in sites} == {("m@1", 2.0, 0.01)}


def test_a_nonce_is_good_once_and_only_the_newest_stay_valid(store: FleetStore) -> None:
    store.register_sites([("a", "eu", "f", key(1))], 0.0)
    for i in range(10):
        store.issue_nonce("a", f"n{i}", float(i), keep=8)
    assert not store.consume_nonce("a", "n0")  # pushed out by newer ones
    assert not store.consume_nonce("b", "n9")  # another site's
    assert store.consume_nonce("a", "n9")
    assert not store.consume_nonce("a", "n9")  # used up


def test_a_rollout_round_trips_and_a_stale_save_is_refused(store: FleetStore) -> None:
    store.register_sites([(f"s{i}", "eu", "f", key(i)) for i in range(20)], 0.0)
    rollout, _ = Rollout.start(
        "r1",
        "m@2",
        "f",
        RolloutPolicy(),
        {f"s{i}": "m@1" for i in range(20)},
        {"error_rate": 0.01},
        5.0,
    )
    store.create_rollout(
        rollout, desired={"s1": "m@2"}, events=[(None, "wave_started", {"wave": 0})], now=5.0
    )
    loaded, version = store.load_rollout("r1")  # type: ignore[misc]
    assert loaded == rollout
    assert store.site("s1").desired == "m@2"  # type: ignore[union-attr]
    loaded.pause(6.0)
    assert store.save_rollout(loaded, version, [], now=6.0) == version + 1
    with pytest.raises(StaleRolloutError, match="changed by another command"):
        store.save_rollout(loaded, version, [], now=7.0)
    assert store.rollouts("f")[0]["state"] == "paused"
    assert [e["kind"] for e in store.events("r1")] == ["wave_started"]


def test_a_database_error_is_a_storage_error(tmp_path: Path) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {PREFIX}sites")
    with pytest.raises(StorageError, match="cannot read sites"):
        store.sites()


def test_a_bad_store_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="store URL"):
        FleetStore("not a url")


def test_sync_state_and_cloud_results_share_one_database(store: FleetStore) -> None:
    """`fogline cloud serve --store URL --sync-store URL` with one URL: the result table
    and the prefixed sync tables live side by side, each store reading its own."""
    from fogline.cloud_service._store import ResultStore, StoredResult

    results = ResultStore(store.url)
    try:
        results.put_many(
            [StoredResult("site-a", "ab" * 16, "m@1", 3, 0.9, (0.1, 0.9), "w", 1, 2, 3)]
        )
        store.register_sites([("site-a", "eu", "f", key(1))], now=1.0)
        store.record_reports([StatusReport("site-a", "n", bundle="m@1", phase="active")], 2.0)
        got = results.get("site-a", "ab" * 16)
        assert got is not None
        assert got.label == 3
        (site,) = store.sites("f")
        assert site.bundle == "m@1"
        assert results.count() == 1
    finally:
        results.close()
