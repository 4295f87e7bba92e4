"""The rollout service as the cloud serves it: nonces and signed status reports over a
real uvicorn server and a real fleet store, the tick thread that steps rollouts with no
one calling tick, and the retained nudge on a real Mosquitto."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline.cloud_service import SyncConfig
from fogline.cloud_service._sync import CloudSync
from fogline.cloud_service._sync_api import MAX_REPORT_BYTES, status_for
from fogline.messaging import MqttSettings, Topics
from fogline.sync import (
    FleetStore,
    RolloutPolicy,
    RolloutService,
    StatusReport,
    SyncError,
    SyncHome,
    errors,
    generate_key,
    make_status_report,
)
from tests.cloud_service._sync_stand import SyncStand, enroll_site, make_home, sync_stand
from tests.edge_agent._sync_fleet import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[SyncStand]:
    with sync_stand(tmp_path) as s:
        yield s


def _nonce(stand: SyncStand, site: str = "site-a") -> str:
    got = httpx.get(f"{stand.url}/v1/sync/sites/{site}/nonce")
    assert got.status_code == 200, got.text
    nonce: str = got.json()["nonce"]
    return nonce


def _report(stand: SyncStand, nonce: str, site: str = "site-a", **fields: Any) -> bytes:
    report = StatusReport(site=site, nonce=nonce, **fields)
    return make_status_report(report, stand.sites[site].identity.signer())


def _post(stand: SyncStand, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{stand.url}/v1/sync/reports", content=body, headers={"Content-Type": "application/json"}
    )


def test_every_sync_error_has_a_status() -> None:
    for name in errors.__all__:
        kind = getattr(errors, name)
        assert issubclass(kind, SyncError)
        assert status_for(kind.__new__(kind)) is not None, name
    assert status_for(errors.ReplayedReportError("x")) == 409
    assert status_for(errors.ReportError("x")) == 400
    assert status_for(errors.StorageError("x")) == 503
    assert status_for(RuntimeError("x")) is None


def test_a_site_gets_a_nonce_and_its_signed_report_is_accepted_and_stored(
    stand: SyncStand,
) -> None:
    body = _report(stand, _nonce(stand), bundle="tiny@1", phase="active", health={"items": 3.0})
    got = _post(stand, body)
    assert got.status_code == 202, got.text
    assert got.json() == {"site": "site-a", "phase": "active"}
    record = stand.sync.store.site("site-a")
    assert record is not None
    assert record.bundle == "tiny@1"
    assert record.phase == "active"
    assert record.health == {"items": 3.0}


def test_attack_a_replayed_report_is_refused_409_and_stores_nothing(stand: SyncStand) -> None:
    first = _report(stand, _nonce(stand), bundle="tiny@1", phase="active")
    assert _post(stand, first).status_code == 202
    seen = stand.sync.store.site("site-a")
    again = _post(stand, first)
    assert again.status_code == 409
    assert "replayed" in again.json()["error"]
    assert stand.sync.store.site("site-a") == seen
    # a nonce the cloud never issued is a replay too
    made_up = _post(stand, _report(stand, "f" * 32, bundle="tiny@2", phase="failed"))
    assert made_up.status_code == 409
    assert stand.sync.store.site("site-a") == seen


def test_attack_a_report_signed_by_another_key_is_refused_400(stand: SyncStand) -> None:
    report = StatusReport(site="site-a", nonce=_nonce(stand), bundle="tiny@2", phase="active")
    forged = make_status_report(report, generate_key())
    got = _post(stand, forged)
    assert got.status_code == 400
    assert "not signed by its key" in got.json()["error"]
    assert stand.sync.store.site("site-a").last_seen is None  # type: ignore[union-attr]


def test_a_malformed_report_is_refused_400_naming_the_problem(stand: SyncStand) -> None:
    for body in (b"", b"not json", b"[]", json.dumps({"payload": "x"}).encode()):
        got = _post(stand, body)
        assert got.status_code == 400, body
        assert "status report" in got.json()["error"]


def test_an_unregistered_site_gets_no_nonce(stand: SyncStand) -> None:
    got = httpx.get(f"{stand.url}/v1/sync/sites/site-z/nonce")
    assert got.status_code == 404
    assert "not registered" in got.json()["error"]
    odd = httpx.get(f"{stand.url}/v1/sync/sites/..%20x/nonce")
    assert odd.status_code == 404


def test_an_oversized_report_is_refused_413(stand: SyncStand) -> None:
    got = _post(stand, b"x" * (MAX_REPORT_BYTES + 1))
    assert got.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it comes
        for _ in range(MAX_REPORT_BYTES // 1024 + 2):
            yield b"x" * 1024

    streamed = httpx.post(f"{stand.url}/v1/sync/reports", content=chunks())
    assert streamed.status_code == 413


def test_a_store_that_fails_answers_503_and_the_server_goes_on(stand: SyncStand) -> None:
    with stand.sync.store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE fogline_sync_nonces")
    got = httpx.get(f"{stand.url}/v1/sync/sites/site-a/nonce")
    assert got.status_code == 503
    assert "nonces" in got.json()["error"]
    assert httpx.get(f"{stand.url}/sync/director/metadata/timestamp.json").status_code == 200


# -------------------------------------------------------------------------- the tick


def test_the_tick_thread_completes_a_rollout_with_no_one_calling_tick(tmp_path: Path) -> None:
    with sync_stand(tmp_path, tick_s=0.05) as stand:
        policy = RolloutPolicy(canary=0.0, waves=(1.0,), bake_s=0.0)
        started = stand.sync.service.start("tiny@2", "fleet-1", policy)
        assert started["state"] == "running"
        body = _report(stand, _nonce(stand), bundle="tiny@2", phase="active")
        assert _post(stand, body).status_code == 202
        wait_for(lambda: stand.sync.service.status(fleet="fleet-1")["state"] == "completed")
        assert stand.sync.ticks > 0


def test_a_failed_tick_is_counted_and_the_next_one_carries_on(tmp_path: Path) -> None:
    with sync_stand(tmp_path, sites=("site-a", "site-b"), tick_s=0.05) as stand:
        policy = RolloutPolicy(canary=0.5, waves=(1.0,), bake_s=0.0)
        stand.sync.service.start("tiny@2", "fleet-1", policy)
        first = next(s.site for s in stand.sync.store.sites() if s.desired == "tiny@2")
        body = _report(stand, _nonce(stand, first), site=first, bundle="tiny@2", phase="active")
        # The next wave needs the director signed; while its keys are away (a volume not
        # mounted), every tick fails, and the rollout waits.
        keys = stand.home.path / "keys"
        away = keys.rename(keys.with_name("keys-away"))
        try:
            assert _post(stand, body).status_code == 202
            wait_for(lambda: stand.sync.tick_failures >= 2)
            assert stand.sync.supervisor.counts()["rollout_tick"] >= 2
        finally:
            away.rename(keys)
        wait_for(lambda: all(s.desired == "tiny@2" for s in stand.sync.store.sites()))
        assert stand.sync.service.status(fleet="fleet-1")["wave"] == 1


def test_the_directors_online_keys_may_live_apart_from_the_home(tmp_path: Path) -> None:
    """`[sync] keys` (or $FOGLINE_SYNC_KEYS): the keys on another volume, none in the home;
    the cloud's service signs the director with them."""
    home = make_home(tmp_path)
    apart = (home.path / "keys").rename(tmp_path / "online-keys")
    site = enroll_site(home, tmp_path, "site-a")
    sync = CloudSync(SyncConfig(home.path, keys=apart), Topics("fogline/test"))
    try:
        sync.service.register_sites([("site-a", "eu", "fleet-1", site.identity.public_key)])
        policy = RolloutPolicy(canary=0.0, waves=(1.0,), bake_s=0.0)
        sync.service.start("tiny@2", "fleet-1", policy)
        release = SyncHome(home.path, apart).director().desired("site-a")
        assert release is not None
        assert release.id == "tiny@2"
    finally:
        sync.stop()
    bare = CloudSync(SyncConfig(home.path), Topics("fogline/test"))
    try:
        with pytest.raises(SyncError):  # without them, nothing can be signed
            bare.service.start("tiny@1", "fleet-1", policy)
    finally:
        bare.stop()


def test_a_tick_while_another_command_signs_is_dropped_not_counted_as_a_failure(
    tmp_path: Path,
) -> None:
    with sync_stand(tmp_path, sites=("site-a", "site-b"), tick_s=0.05) as stand:
        policy = RolloutPolicy(canary=0.5, waves=(1.0,), bake_s=0.0)
        stand.sync.service.start("tiny@2", "fleet-1", policy)
        first = next(s.site for s in stand.sync.store.sites() if s.desired == "tiny@2")
        body = _report(stand, _nonce(stand, first), site=first, bundle="tiny@2", phase="active")
        with stand.home.lock():  # `fogline rollout …` or `bundle assign` signing now
            assert _post(stand, body).status_code == 202
            ticks = stand.sync.ticks
            wait_for(lambda: stand.sync.ticks >= ticks + 3)
            assert stand.sync.service.status(fleet="fleet-1")["wave"] == 0
        wait_for(lambda: all(s.desired == "tiny@2" for s in stand.sync.store.sites()))
        assert stand.sync.tick_failures == 0


# ------------------------------------------------------------------------- the nudge


def _retained(broker: Any, topics: list[str]) -> dict[str, bytes]:
    """What a client subscribing now receives on ``topics`` (retained messages)."""
    got: dict[str, bytes] = {}
    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got[msg.topic] = msg.payload
        if set(got) >= set(topics):
            done.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic in topics:
            client.subscribe(topic, qos=1)
        done.wait(15)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_each_assigned_site_gets_a_retained_nudge_on_mosquitto(
    tmp_path: Path, broker: Any, topic_prefix: str
) -> None:
    settings = MqttSettings(
        host=broker.host, port=broker.port, topic_prefix=topic_prefix, client_id="sync-test"
    )
    sites = ("site-a", "site-b", "site-c")
    with sync_stand(tmp_path, sites=sites, topic_prefix=topic_prefix, mqtt=settings) as stand:
        policy = RolloutPolicy(canary=0.0, waves=(1.0,), bake_s=0.0)
        stand.sync.service.start("tiny@2", "fleet-1", policy)
        wait_for(lambda: stand.sync.nudges == 3)
        topics = Topics(topic_prefix)
        got = _retained(broker, [topics.sync(s) for s in sites])
        assert {t: json.loads(p) for t, p in got.items()} == {
            topics.sync(s): {"bundle": "tiny@2"} for s in sites
        }
        stand.sync.service.abort(fleet="fleet-1")  # back to nothing: a null bundle
        wait_for(lambda: stand.sync.nudges == 6)
        got = _retained(broker, [topics.sync(s) for s in sites])
        assert {json.dumps(json.loads(p)) for p in got.values()} == {'{"bundle": null}'}
        assert stand.sync.nudge_failures == 0


def test_a_rollout_started_from_the_command_line_is_nudged_at_the_next_tick(
    tmp_path: Path, broker: Any, topic_prefix: str
) -> None:
    """`fogline rollout start` writes the store and the director from another process,
    with no broker: the serving cloud finds the change at its next tick and nudges each
    site once; a later tick with nothing new nudges nobody."""
    settings = MqttSettings(
        host=broker.host, port=broker.port, topic_prefix=topic_prefix, client_id="sync-cli"
    )
    sites = ("site-a", "site-b")
    with sync_stand(tmp_path, sites=sites, topic_prefix=topic_prefix, mqtt=settings) as stand:
        other = FleetStore(stand.sync.store.url)  # what the command opens
        try:
            cli = RolloutService(other, SyncHome(stand.home.path))
            cli.start("tiny@2", "fleet-1", RolloutPolicy(canary=0.0, waves=(1.0,), bake_s=60.0))
        finally:
            other.close()
        assert stand.sync.nudges == 0
        stand.sync.tick()
        assert stand.sync.nudges == 2
        topics = Topics(topic_prefix)
        got = _retained(broker, [topics.sync(s) for s in sites])
        assert {t: json.loads(p) for t, p in got.items()} == {
            topics.sync(s): {"bundle": "tiny@2"} for s in sites
        }
        stand.sync.tick()
        assert stand.sync.nudges == 2


def test_serve_refuses_a_sync_home_that_is_not_initialised_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    fogline = str(Path(sys.executable).with_name("fogline"))
    done = subprocess.run(
        [fogline, "cloud", "serve", "--sync-home", str(tmp_path / "none"), "--port", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: sync.home:")
    assert "fogline keys init" in done.stderr
