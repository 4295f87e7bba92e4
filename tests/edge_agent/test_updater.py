"""A real agent (Python API) updated by its site's signed sync: a hot swap under a stream of
inputs, a director that points back mid-download, and expired metadata."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline._mqtt import MqttSettings
from fogline.edge_agent import Agent, AgentConfig, Answer, RuntimeConfig
from fogline.edge_agent._config import SyncConfig
from fogline.edge_agent._installed import read_installed
from fogline.messaging import Topics
from tests.edge_agent._sync_fleet import SyncFleet, make_sync_fleet, wait_for
from tests.edge_agent.conftest import edge_outputs, frames


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SyncFleet]:
    f = make_sync_fleet(tmp_path / "fleet")
    try:
        yield f
    finally:
        f.server.stop()


def _agent(fleet: SyncFleet, broker: Any, topic_prefix: str, **sync: Any) -> Agent:
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        topic_prefix=topic_prefix,
        reconnect_min_s=1,
        reconnect_max_s=1,
        connect_timeout_s=10,
    )
    config = AgentConfig(
        site=fleet.site,
        bundle_dir=fleet.bundles["1"],
        broker=settings,
        runtime=RuntimeConfig(max_batch=8, warmup_runs=1),
        cloud_timeout_ms=5000,
        sync=SyncConfig(state_dir=fleet.state_dir, url=fleet.server.url, **sync),
    )
    return Agent(config)


def _nudge(broker: Any, topic_prefix: str, site: str) -> None:
    """The retained nudge the rollout service publishes: any payload, never trusted."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        topic = Topics(topic_prefix).sync(site)
        client.publish(topic, b"not json, not signed", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def _running(fleet: SyncFleet) -> str | None:
    current = read_installed(fleet.state_dir).current
    return None if current is None else current.id


def test_agent_swaps_bundles_under_a_stream_of_inputs_dropping_none(
    fleet: SyncFleet, broker: Any, topic_prefix: str, responder_factory: Any
) -> None:
    responder_factory(fleet.bundles["1"])
    fleet.assign("1")
    agent = _agent(fleet, broker, topic_prefix, poll_s=300, report_s=300)
    batch = frames(8, seed=3)
    # What each bundle's edge model says of the batch: an answer's relevance names the
    # bundle that decided it.
    relevance = {
        f"tiny@{v}": edge_outputs(fleet.bundles[v], batch)["relevance"].reshape(-1)
        for v in ("1", "2")
    }
    assert not np.allclose(relevance["tiny@1"], relevance["tiny@2"])
    with agent:
        wait_for(lambda: _running(fleet) == "tiny@1")
        wait_for(lambda: agent.bundle_id == "tiny@1")
        sent: list[Future[Answer]] = []
        stop = threading.Event()

        def stream() -> None:
            while not stop.is_set():
                sent.extend(agent.submit_batch(batch))
                for k in range(len(batch)):
                    sent.append(agent.submit(batch[k]))
                time.sleep(0.005)

        feeder = threading.Thread(target=stream)
        feeder.start()
        try:
            time.sleep(0.2)
            fleet.assign("2")
            _nudge(broker, topic_prefix, fleet.site)
            wait_for(lambda: agent.bundle_id == "tiny@2")
            wait_for(lambda: _running(fleet) == "tiny@2")
            time.sleep(0.2)
        finally:
            stop.set()
            feeder.join(10)
        answers = [f.result(timeout=15) for f in sent]
        counts = agent.updater.counters() if agent.updater is not None else {}
    # tiny@1 installed first through sync, then tiny@2; each counted with its bytes
    assert counts["installs_first"] == 1
    assert counts["installs_update"] == 1
    assert counts["verify_failures"] == 0
    assert 0 < counts["bytes_transferred_first"] <= counts["bytes_full_first"]
    assert 0 < counts["bytes_transferred_update"] <= counts["bytes_full_update"]
    # Nothing dropped, every answer from one bundle throughout: its relevance is what the
    # bundle it names computed for that input.
    n = len(batch)
    per_bundle = {a.bundle for a in answers}
    assert per_bundle == {"tiny@1", "tiny@2"}
    for k, a in enumerate(answers):
        i = k % (2 * n)
        i = i if i < n else i - n
        assert a.relevance == pytest.approx(float(relevance[a.bundle][i]), abs=1e-6)
    assert all(a.status == "ok" for a in answers)
    installed = read_installed(fleet.state_dir)
    assert installed.previous is not None
    assert installed.previous.id == "tiny@1"
    phases = fleet.server.phases()
    assert phases[-3:] == ["downloading", "verified", "active"]
    last = fleet.server.reports[-1]
    assert last.bundle == "tiny@2"
    assert last.desired is None
    assert not last.stale
    assert set(last.health) >= {
        "error_rate",
        "latency_p50_ms",
        "latency_p99_ms",
        "items",
        "agreement_rate",
    }
    assert not fleet.server.refused_reports


def test_director_pointing_back_during_download_leaves_the_old_bundle(
    fleet: SyncFleet, broker: Any, topic_prefix: str
) -> None:
    fleet.assign("1")
    agent = _agent(fleet, broker, topic_prefix, poll_s=300, report_s=300)
    with agent:
        wait_for(lambda: _running(fleet) == "tiny@1")
        fleet.server.gate = "/2/"
        fleet.assign("2")
        agent.updater.nudge()  # type: ignore[union-attr]
        assert fleet.server.gated.wait(20)
        fleet.assign("1")  # the director points back while tiny@2 downloads
        fleet.server.gate_open.set()
        wait_for(
            lambda: fleet.server.phases()[-1:] == ["active"] and "verified" in fleet.server.phases()
        )
        time.sleep(0.3)
        assert agent.bundle_id == "tiny@1"
        assert agent.submit_batch(frames(2))[0].result(10).bundle == "tiny@1"
    assert _running(fleet) == "tiny@1"
    assert read_installed(fleet.state_dir).previous is None
    # The downloaded tiny@2 is not kept: only the bundles the site ran stay.
    assert not (fleet.state_dir / "bundles" / "tiny" / "2").exists()


def test_expired_metadata_keeps_serving_and_reports_stale(
    fleet: SyncFleet, broker: Any, topic_prefix: str
) -> None:
    fleet.assign("1")
    agent = _agent(fleet, broker, topic_prefix, poll_s=0.3, report_s=300)
    with agent:
        wait_for(lambda: _running(fleet) == "tiny@1")
        fleet.expire_director_timestamp()
        fleet.assign("2")  # signed with a timestamp that expires in 0.09 s
        time.sleep(0.2)
        report = wait_for(lambda: [r for r in fleet.server.reports if r.stale], 20)[-1]
        assert report.bundle == "tiny@1"
        assert "ExpiredError" in (report.error or "")
        time.sleep(0.7)  # more polls: each retried, none installs
        assert agent.bundle_id == "tiny@1"
        answer = agent.submit_batch(frames(2))[0].result(10)
        assert answer.bundle == "tiny@1"
        assert agent.updater is not None
        assert agent.updater.state.stale
    assert _running(fleet) == "tiny@1"
