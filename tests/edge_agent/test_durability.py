"""Nothing lost: the agent's outbox, re-sends, evictions and circuit breaker against a real
Mosquitto, a stand-in cloud that comes and goes, and an agent process killed with SIGKILL."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline._mqtt import MqttSettings
from fogline.compression import Codec, Envelope, Kind, encode_envelope
from fogline.edge_agent import (
    Agent,
    AgentConfig,
    Answer,
    BreakerConfig,
    CloudTimeoutError,
    CloudUnavailableError,
    Delivery,
    OutboxConfig,
    OutboxError,
    OutboxEvictedError,
    OutboxQuarantinedError,
    OutboxStorageFullError,
    RuntimeConfig,
)
from tests.conftest import Broker
from tests.edge_agent.conftest import fill, frames

pytestmark = pytest.mark.integration

FORWARD_ALL = {"relevance": 0.0, "exit_confidence": 1.0}
# Re-sends come quickly in tests: 250 ms, doubling up to 1 s.
FAST_RETRY = {"retry_initial_ms": 250, "retry_max_ms": 1000}


class Deliveries:
    """Collects what ``on_answer`` receives (from the agent's threads)."""

    def __init__(self) -> None:
        self._items: list[Delivery] = []
        self._cond = threading.Condition()

    def __call__(self, delivery: Delivery) -> None:
        with self._cond:
            self._items.append(delivery)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[Delivery]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout_s):
                raise AssertionError(f"{len(self._items)} deliveries of {n} after {timeout_s} s")
            return list(self._items)

    def snapshot(self) -> list[Delivery]:
        with self._cond:
            return list(self._items)


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


AgentMaker = Callable[..., Agent]


@pytest.fixture
def make_agent(broker: Broker, topic_prefix: str) -> Iterator[AgentMaker]:
    """Start agents on the test broker with an ``on_answer`` callback; stopped at teardown.

    Agents of one site share their outbox file (the test's own state directory), so a
    second agent for the same site is the first one restarted."""
    agents: list[Agent] = []

    def make(
        bundle: Path,
        *,
        on_answer: Callable[[Delivery], None] | None = None,
        site: str = "site-a",
        outbox: OutboxConfig | None = None,
        wait_connected: bool = True,
        clean_start: bool = True,
        **overrides: Any,
    ) -> Agent:
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            topic_prefix=topic_prefix,
            clean_start=clean_start,
            reconnect_min_s=1,
            reconnect_max_s=1,
            connect_timeout_s=10,
        )
        config = AgentConfig(
            site=site,
            bundle_dir=bundle,
            broker=settings,
            runtime=RuntimeConfig(max_batch=16, warmup_runs=1),
            outbox=outbox or OutboxConfig(**FAST_RETRY),
            **overrides,
        )
        agent = Agent(config, on_answer=on_answer)
        agents.append(agent)
        agent.start(wait_connected=wait_connected)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def _answers_once_each(deliveries: list[Delivery], tags: list[str]) -> dict[str, Answer]:
    """Every tag got exactly one delivery, and it is the cloud's answer."""
    counts = Counter(d.tag for d in deliveries)
    assert counts == Counter(tags), counts
    assert len({d.message_id for d in deliveries}) == len(tags)
    out: dict[str, Answer] = {}
    for d in deliveries:
        assert d.error is None, d.error
        assert d.answer is not None
        assert d.answer.source == "cloud"
        assert d.answer.status == "ok"
        assert d.answer.tag == d.tag
        assert d.answer.message_id == d.message_id
        assert d.answer.label is not None
        out[d.tag or ""] = d.answer
    return out


def _no_late_duplicates(agent: Agent, deliveries: Deliveries, expected: int) -> None:
    """Re-sends still in flight may bring more cloud answers: none may reach on_answer."""
    agent.flush(5)
    time.sleep(0.5)
    assert len(deliveries.snapshot()) == expected
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    assert _wait_until(agent.drained)


def test_a_restarted_agent_resends_the_unanswered_items_and_delivers_each_once(
    bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    first = make_agent(bundle, cloud_timeout_ms=200)
    tags = [f"item-{i}" for i in range(10)]
    degraded = [f.result(10) for f in first.submit_batch(frames(10), tags=tags)]
    assert {a.status for a in degraded} == {"degraded"}
    assert first.stats()["outbox_items"] == 10
    first.stop()

    deliveries = Deliveries()
    second = make_agent(bundle, on_answer=deliveries)
    assert second.config.outbox_path == first.config.outbox_path
    assert second.stats()["outbox_items"] == 10
    assert second.stats()["pending"] == 10
    m = second.metrics
    assert m.value("fogline_agent_outbox_items") == 10
    assert m.value("fogline_agent_outbox_bytes") > 0
    assert m.value("fogline_agent_outbox_oldest_age_seconds") > 0
    assert deliveries.snapshot() == []  # nobody answers yet

    cloud = responder_factory(bundle)
    got = _answers_once_each(deliveries.wait_for(10), tags)
    # Found in the outbox at start-up: the application may have seen them before.
    assert all(d.recovered for d in deliveries.snapshot())
    assert {a.message_id for a in got.values()} == {a.message_id for a in degraded}
    for answer in got.values():
        assert answer.label == cloud.labels[bytes.fromhex(answer.message_id or "")]
    _no_late_duplicates(second, deliveries, 10)
    assert second.stats()["resends"] >= 10
    assert second.metrics.value("fogline_agent_detached_outcomes_total", {"kind": "answer"}) == 10


def test_while_the_broker_is_down_callers_get_degraded_answers_and_nothing_is_lost(
    broker, bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    deliveries = Deliveries()
    agent = make_agent(bundle, on_answer=deliveries)
    assert agent.submit_batch(frames(1))[0].result(10).source == "cloud"

    broker.stop()
    assert _wait_until(lambda: not agent.connected)
    tags = [f"offline-{i}" for i in range(6)]
    answers = [f.result(10) for f in agent.submit_batch(frames(6, seed=1), tags=tags)]
    # Answered at once by the edge: no caller waited for the cloud, none timed out.
    assert [a.status for a in answers] == ["degraded"] * 6
    assert [a.source for a in answers] == ["edge"] * 6
    assert [a.tag for a in answers] == tags
    stats = agent.stats()
    assert stats["timeouts"] == 0
    assert stats["degraded"] == 6
    assert stats["outbox_items"] == 6

    broker.start()
    got = _answers_once_each(deliveries.wait_for(6, timeout_s=30), tags)
    # Detached in this run, not recovered: their outcome comes once.
    assert not any(d.recovered for d in deliveries.snapshot())
    by_tag = {a.tag: a for a in answers}
    for tag, answer in got.items():
        assert answer.message_id == by_tag[tag].message_id
    _no_late_duplicates(agent, deliveries, 6)
    assert agent.circuit_state == "closed"


def test_while_the_broker_is_down_a_failing_agent_says_the_cloud_is_unavailable(
    broker, bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    deliveries = Deliveries()
    agent = make_agent(bundle, on_answer=deliveries, breaker=BreakerConfig(offline="fail"))
    broker.stop()
    assert _wait_until(lambda: not agent.connected)
    futures = agent.submit_batch(frames(3), tags=["a", "b", "c"])
    for fut in futures:
        with pytest.raises(CloudUnavailableError, match="not connected to the broker"):
            fut.result(10)
    assert agent.stats()["outbox_items"] == 3

    broker.start()
    responder_factory(bundle)
    _answers_once_each(deliveries.wait_for(3, timeout_s=30), ["a", "b", "c"])
    _no_late_duplicates(agent, deliveries, 3)


def _evicted_by(futures: list[Future[Answer]]) -> int:
    n = 0
    for fut in futures:
        if isinstance(fut.exception(10), OutboxEvictedError):
            n += 1
    return n


def test_evictions_by_max_items_are_counted_and_the_rest_is_answered(
    bundle_factory, make_agent, responder_factory, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="fogline.edge_agent")
    bundle = bundle_factory(**FORWARD_ALL)
    deliveries = Deliveries()
    agent = make_agent(
        bundle,
        on_answer=deliveries,
        cloud_timeout_ms=200,
        outbox=OutboxConfig(max_items=5, **FAST_RETRY),
        # Keep callers waiting for the cloud, so evictions reach their futures too.
        breaker=BreakerConfig(failure_threshold=1000),
    )
    old = agent.submit_batch(frames(4, seed=1), tags=[f"old-{i}" for i in range(4)])
    assert {f.result(10).status for f in old} == {"degraded"}  # now detached
    fresh = agent.submit_batch(frames(4, seed=2), tags=[f"fresh-{i}" for i in range(4)])
    # 8 items, 5 fit: the three oldest of equal priority went, to on_answer.
    evicted_deliveries = deliveries.wait_for(3)
    assert sorted(d.tag or "" for d in evicted_deliveries) == ["old-0", "old-1", "old-2"]
    for d in evicted_deliveries:
        assert isinstance(d.error, OutboxEvictedError)
        assert d.error.reason == "max_items"
        assert d.answer is None
    assert {f.result(10).status for f in fresh} == {"degraded"}
    # Lower priority than everything held: these are evicted at once, to their callers.
    low = agent.submit_batch(frames(2, seed=3), tags=["low-0", "low-1"], priority=-1)
    assert _evicted_by(low) == 2
    for fut in low:
        exc = fut.exception(0)
        assert isinstance(exc, OutboxEvictedError)
        assert exc.reason == "max_items"

    evicted_outcomes = _evicted_by(low) + sum(
        isinstance(d.error, OutboxEvictedError) for d in deliveries.snapshot()
    )
    stats = agent.stats()
    assert stats["evicted"] == evicted_outcomes == 5
    m = agent.metrics
    assert m.value("fogline_agent_outbox_evictions_total", {"reason": "max_items"}) == 5
    assert m.value("fogline_agent_outbox_evictions_total", {"reason": "max_bytes"}) == 0
    assert stats["outbox_items"] == 5
    logged = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert logged
    assert all("bound max_items reached" in line for line in logged)
    assert sum(int(line.split("evicted ")[1].split()[0]) for line in logged) == 5

    responder_factory(bundle)
    all_deliveries = deliveries.wait_for(8)
    answered = [d for d in all_deliveries if d.answer is not None]
    _answers_once_each(answered, ["old-3", *(f"fresh-{i}" for i in range(4))])
    assert len(all_deliveries) == 3 + 5
    _no_late_duplicates(agent, deliveries, 8)
    assert agent.stats()["evicted"] == 5


def test_an_item_evicted_as_it_is_stored_while_offline_is_reported_evicted_to_its_caller(
    broker, bundle_factory, make_agent
) -> None:
    deliveries = Deliveries()
    agent = make_agent(
        bundle_factory(**FORWARD_ALL),
        on_answer=deliveries,
        outbox=OutboxConfig(max_items=2, **FAST_RETRY),
        breaker=BreakerConfig(offline="fail"),
    )
    broker.stop()
    assert _wait_until(lambda: not agent.connected)
    for fut in agent.submit_batch(frames(2), priority=5):
        assert isinstance(fut.exception(10), CloudUnavailableError)
    low = agent.submit_batch(frames(1, seed=4), tags=["low"], priority=0)[0]
    assert agent.stats()["evicted"] == 1
    exc = low.exception(10)
    assert isinstance(exc, OutboxEvictedError), exc
    assert deliveries.snapshot() == []  # its one outcome went to its caller


def _features(spy: Any) -> int:
    return sum(t.endswith("/features") for t in spy.messages)


def test_items_the_outbox_file_refuses_fail_with_the_reason_and_are_never_published(
    bundle_factory, make_agent, responder_factory, spy
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    deliveries = Deliveries()
    agent = make_agent(bundle, on_answer=deliveries)
    assert agent.submit_batch(frames(1))[0].result(10).source == "cloud"
    # Feature envelopes only; the first item's may still be on its way to the spy.
    assert _wait_until(lambda: _features(spy) == 1)
    published = _features(spy)
    # The file refuses one tag, as a full disk would refuse everything.
    db = sqlite3.connect(agent.config.outbox_path)
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox WHEN NEW.tag = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )
    db.commit()
    db.close()
    bad = agent.submit_batch(frames(2, seed=3), tags=["poison", "poison"])
    for fut in bad:
        exc = fut.exception(10)
        assert isinstance(exc, OutboxError), exc
        assert "the outbox refused 2 items" in str(exc)
        assert "refused by the test" in str(exc)
    time.sleep(0.2)  # what was published would have reached the spy by now
    assert _features(spy) == published  # nothing of them left the site
    # The agent carries on: other items are stored, answered and deleted.
    good = [f.result(10) for f in agent.submit_batch(frames(3, seed=4), tags=["a", "b", "c"])]
    assert [a.source for a in good] == ["cloud"] * 3
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    assert _wait_until(agent.drained)
    assert deliveries.snapshot() == []


def test_a_fault_in_the_outbox_journal_fails_its_items_and_the_agent_carries_on(
    bundle_factory, make_agent, responder_factory, monkeypatch
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    agent = make_agent(bundle)
    release = agent._release
    faults = iter([RuntimeError("injected fault")])

    def faulty(*args: Any) -> None:
        fault = next(faults, None)
        if fault is not None:
            raise fault
        release(*args)

    monkeypatch.setattr(agent, "_release", faulty)
    for fut in agent.submit_batch(frames(2)):
        exc = fut.exception(10)
        assert isinstance(exc, OutboxError), exc
        assert "injected fault" in str(exc)
    assert agent.stats()["outbox_items"] == 0  # that error is their only outcome
    answers = [f.result(10) for f in agent.submit_batch(frames(2, seed=5))]
    assert [a.source for a in answers] == ["cloud", "cloud"]
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    assert _wait_until(agent.drained)


def test_in_a_persistent_session_results_sent_while_the_agent_was_away_reach_its_successor(
    broker, bundle_factory, make_agent, topic_prefix
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    no_resend = OutboxConfig(retry_initial_ms=60_000, retry_max_ms=60_000)
    first = make_agent(bundle, clean_start=False, cloud_timeout_ms=200, outbox=no_resend)
    tags = ["away-0", "away-1", "away-2"]
    degraded = [f.result(10) for f in first.submit_batch(frames(3), tags=tags)]
    assert {a.status for a in degraded} == {"degraded"}
    first.stop()

    # The cloud answers while the agent is gone; the broker keeps the results (QoS 1).
    cloud = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="away-cloud")
    cloud.connect(broker.host, broker.port)
    cloud.loop_start()
    for n, answer in enumerate(degraded):
        result = Envelope(
            kind=Kind.RESULT,
            message_id=bytes.fromhex(answer.message_id or ""),
            site="site-a",
            bundle=answer.bundle,
            meta={"status": "ok", "label": n, "confidence": 0.9, "worker": "away"},
            codec=Codec.FP16,
        )
        payload = encode_envelope(result, compress=False)
        cloud.publish(f"{topic_prefix}/site-a/results", payload, qos=1).wait_for_publish(5)
    cloud.disconnect()
    cloud.loop_stop()

    deliveries = Deliveries()
    second = make_agent(bundle, clean_start=False, on_answer=deliveries, outbox=no_resend)
    got = deliveries.wait_for(3)
    assert sorted((d.tag, d.answer.label if d.answer else None) for d in got) == [
        ("away-0", 0),
        ("away-1", 1),
        ("away-2", 2),
    ]
    assert second.stats()["resends"] == 0  # answered by what the broker kept
    assert _wait_until(lambda: second.stats()["outbox_items"] == 0)


def test_items_older_than_max_age_are_evicted_and_their_callers_told(
    bundle_factory, make_agent
) -> None:
    deliveries = Deliveries()
    agent = make_agent(
        bundle_factory(**FORWARD_ALL),
        on_answer=deliveries,
        cloud_timeout_ms=60_000,
        outbox=OutboxConfig(max_age_s=0.3, **FAST_RETRY),
    )
    futures = agent.submit_batch(frames(2), tags=["aged-0", "aged-1"])
    for fut in futures:
        exc = fut.exception(20)
        assert isinstance(exc, OutboxEvictedError)
        assert exc.reason == "max_age"
    assert agent.stats()["evicted"] == 2
    assert agent.metrics.value("fogline_agent_outbox_evictions_total", {"reason": "max_age"}) == 2
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    assert _wait_until(agent.drained)
    assert deliveries.snapshot() == []  # the waiting callers got the outcome


def test_an_agent_whose_disk_is_full_at_start_says_so_and_its_backlog_waits_for_room(
    small_fs, bundle_factory, make_agent, responder_factory, caplog
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    fs = small_fs("512k")
    outbox = OutboxConfig(path=fs / "outbox.db", **FAST_RETRY)
    first = make_agent(bundle, cloud_timeout_ms=200, outbox=outbox)
    tags = [f"backlog-{i}" for i in range(10)]
    assert {f.result(10).status for f in first.submit_batch(frames(10), tags=tags)} == {"degraded"}
    first.stop()

    filler = fill(fs, leave=0)
    with pytest.raises(OutboxStorageFullError) as caught:
        make_agent(bundle, outbox=outbox)
    message = str(caught.value)
    assert message.startswith("outbox storage full: cannot open the outbox"), message
    assert "0 bytes free on its file system" in message

    # Some room, not much: the agent starts, says how little there is, and delivers.
    filler.unlink()
    filler = fill(fs, leave=100 * 1024)
    caplog.set_level(logging.WARNING, logger="fogline.edge_agent")
    deliveries = Deliveries()
    agent = make_agent(bundle, on_answer=deliveries, outbox=outbox)
    [line] = [r.getMessage() for r in caplog.records if "at start" in r.getMessage()]
    assert "outbox storage nearly full at start" in line
    assert "the 10 items in the outbox are still delivered" in line
    assert agent.stats()["outbox_items"] == 10
    responder_factory(bundle)
    _answers_once_each(deliveries.wait_for(10), tags)
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    filler.unlink()
    answer = agent.submit_batch(frames(1, seed=3), tags=["after"])[0].result(10)
    assert (answer.source, answer.status) == ("cloud", "ok")


def test_the_breaker_opens_after_repeated_timeouts_and_closes_when_the_cloud_answers(
    bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    deliveries = Deliveries()
    agent = make_agent(
        bundle,
        on_answer=deliveries,
        cloud_timeout_ms=200,
        breaker=BreakerConfig(
            failure_threshold=2, open_ms=60_000, max_open_ms=60_000, offline="fail"
        ),
    )

    def gauge() -> float:
        return agent.metrics.value("fogline_agent_circuit_state")

    assert agent.circuit_state == "closed"
    assert gauge() == 0
    for tag in ("t-0", "t-1"):
        with pytest.raises(CloudTimeoutError):
            agent.submit_batch(frames(1, seed=len(tag)), tags=[tag])[0].result(10)
    assert agent.circuit_state == "open"
    assert gauge() == 1

    # Open: later callers do not wait for the cloud at all.
    for tag in ("u-0", "u-1", "u-2"):
        with pytest.raises(CloudUnavailableError, match="circuit breaker open"):
            agent.submit_batch(frames(1), tags=[tag])[0].result(10)
    assert agent.stats()["timeouts"] == 2
    assert agent.stats()["outbox_items"] == 5

    responder_factory(bundle)
    # The re-sent items' answers close the breaker and reach on_answer.
    _answers_once_each(deliveries.wait_for(5), ["t-0", "t-1", "u-0", "u-1", "u-2"])
    assert agent.circuit_state == "closed"
    assert gauge() == 0
    answer = agent.submit_batch(frames(1, seed=9), tags=["after"])[0].result(10)
    assert (answer.source, answer.status, answer.tag) == ("cloud", "ok", "after")
    _no_late_duplicates(agent, deliveries, 5)


# Damaged outbox rows: bytes flipped in the file, rows written by something else.


def _rows(path: Path) -> dict[str, tuple[bytes, bytes]]:
    """The outbox's items by tag: (message id, stored envelope), read on a connection of
    the test's own."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT message_id, payload, tag FROM outbox").fetchall()
    finally:
        db.close()
    return {tag: (bytes(mid), bytes(payload)) for mid, payload, tag in rows}


def _sql(path: Path, sql: str, *args: object) -> Any:
    db = sqlite3.connect(path, timeout=30)
    try:
        out = db.execute(sql, args).fetchall()
        db.commit()
    finally:
        db.close()
    return out


def _overwrite(path: Path, at: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(data)


def _received_ids(responder: Any) -> set[bytes]:
    return {env.message_id for _topic, env, _size in responder.received}


def test_attack_damaged_rows_of_a_stopped_agents_outbox_are_quarantined_and_the_rest_answered(
    bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    first = make_agent(bundle, cloud_timeout_ms=200)
    tags = [f"item-{i}" for i in range(6)]
    assert {f.result(10).status for f in first.submit_batch(frames(6), tags=tags)} == {"degraded"}
    first.stop()  # the log is checkpointed into the file: the rows are in its pages
    path = first.config.outbox_path
    rows = _rows(path)
    raw = path.read_bytes()
    # item-0: 64 bytes of its stored features overwritten in the file.
    at = raw.index(rows["item-0"][1])
    _overwrite(path, at + len(rows["item-0"][1]) - 70, b"\x5a" * 64)
    # item-1: one bit of its key (the key is stored just before the payload), so that its
    # envelope now answers to another id.
    at = raw.index(rows["item-1"][1])
    assert raw[at - 16 : at] == rows["item-1"][0]
    _overwrite(path, at - 1, bytes([raw[at - 1] ^ 1]))
    flipped_id = rows["item-1"][0][:-1] + bytes([raw[at - 1] ^ 1])
    assert _sql(path, "PRAGMA integrity_check") == [("ok",)]  # SQLite sees nothing wrong
    # item-2: its payload rewritten as text; and a row no agent wrote, with a text key.
    _sql(path, "UPDATE outbox SET payload = 'not an envelope' WHERE tag = 'item-2'")
    _sql(path, "INSERT INTO outbox VALUES ('junk', x'00', 0, 1.0, NULL)")

    deliveries = Deliveries()
    agent = make_agent(bundle, on_answer=deliveries)
    cloud = responder_factory(bundle)
    got = {d.tag: d for d in deliveries.wait_for(6)}
    assert sorted(got) == tags
    _answers_once_each([got[t] for t in tags[3:]], tags[3:])
    expected = {"item-0": "bad_envelope", "item-1": "wrong_item", "item-2": "bad_row"}
    for tag, reason in expected.items():
        error = got[tag].error
        assert isinstance(error, OutboxQuarantinedError), (tag, error)
        assert error.reason == reason
        assert str(error).startswith(f"item {got[tag].message_id} was quarantined, not sent")
        assert got[tag].answer is None
        assert got[tag].recovered
    assert got["item-1"].message_id == flipped_id.hex()
    assert "checksum" in str(got["item-0"].error)
    # None of the damaged envelopes reached the cloud, under either id.
    damaged_ids = {rows[t][0] for t in expected} | {flipped_id}
    assert not damaged_ids & _received_ids(cloud)
    m = agent.metrics
    for reason, n in (("bad_envelope", 1), ("wrong_item", 1), ("bad_row", 2)):
        assert m.value("fogline_agent_outbox_quarantined_total", {"reason": reason}) == n
    assert agent.ready
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)
    # The file follows once the journal's last transaction, the answered items' deletes,
    # has committed.
    assert _wait_until(lambda: _sql(path, "SELECT count(*) FROM outbox") == [(0,)])
    assert _sql(path, "SELECT count(*) FROM quarantine") == [(4,)]
    _no_late_duplicates(agent, deliveries, 6)


def test_a_row_damaged_while_its_caller_waits_ends_that_wait_with_the_reason_and_resends_go_on(
    bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    agent = make_agent(
        bundle, cloud_timeout_ms=30_000, breaker=BreakerConfig(failure_threshold=1000)
    )
    tags = ["flipped", "no-magic", "spared"]
    futures = dict(zip(tags, agent.submit_batch(frames(3), tags=tags), strict=True))
    path = agent.config.outbox_path
    rows = _rows(path)
    envelope = bytearray(rows["flipped"][1])
    envelope[len(envelope) // 2] ^= 0x10  # one bit of the features: the old code re-sent it
    _sql(path, "UPDATE outbox SET payload = ? WHERE tag = 'flipped'", bytes(envelope))
    envelope = bytearray(rows["no-magic"][1])
    envelope[:2] = b"XX"  # not an envelope at all: this killed the re-send thread
    _sql(path, "UPDATE outbox SET payload = ? WHERE tag = 'no-magic'", bytes(envelope))

    for tag, reason, detail in (
        ("flipped", "bad_envelope", "bad_checksum"),
        ("no-magic", "bad_envelope", "bad_magic"),
    ):
        error = futures[tag].exception(15)
        assert isinstance(error, OutboxQuarantinedError), (tag, error)
        assert (error.reason, error.message_id) == (reason, rows[tag][0].hex())
        assert detail in error.detail
    # The re-sends go on for the others: a cloud that comes now answers them.
    cloud = responder_factory(bundle)
    answer = futures["spared"].result(15)
    assert (answer.source, answer.status) == ("cloud", "ok")
    assert not {rows["flipped"][0], rows["no-magic"][0]} & _received_ids(cloud)
    later = agent.submit_batch(frames(1, seed=8), tags=["later"])[0].result(15)
    assert later.source == "cloud"
    assert agent.ready
    assert (
        agent.metrics.value("fogline_agent_outbox_quarantined_total", {"reason": "bad_envelope"})
        == 2
    )
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)


# An agent in its own process (argv: host, port, prefix, bundle, outbox, site, extras...),
# so that the tests can SIGKILL it.
_AGENT_PROCESS = """
import os, signal, sys, time
import numpy as np
from fogline._mqtt import MqttSettings
from fogline.edge_agent import Agent, AgentConfig, OutboxConfig, RuntimeConfig

host, port, prefix, bundle, outbox, site = sys.argv[1:7]
config = AgentConfig(
    site=site,
    bundle_dir=bundle,
    broker=MqttSettings(host=host, port=int(port), topic_prefix=prefix),
    cloud_timeout_ms=60_000,
    runtime=RuntimeConfig(max_batch=16, warmup_runs=1),
    outbox=OutboxConfig(path=outbox),
)
agent = Agent(config).start()
"""

_KILLED_AGENT = (
    _AGENT_PROCESS
    + """
n = sys.argv[7]
batch = np.random.default_rng(7).integers(0, 256, (int(n), 1, 8, 8), dtype=np.uint8)
agent.submit_batch(batch[: int(n) // 2], tags=[f"killed-{i}" for i in range(int(n) // 2)])
agent.submit_batch(batch[int(n) // 2 :], tags=[f"killed-{i}" for i in range(int(n) // 2, int(n))])
print("stored", flush=True)
time.sleep(600)
"""
)


def _wait_for_line(proc: subprocess.Popen[str], expected: str, timeout_s: float = 60.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"the agent process printed nothing within {timeout_s} s")
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.wait(10)
        raise AssertionError(f"the agent process printed {line!r}, exit {proc.returncode}")


@contextlib.contextmanager
def _agent_process(
    script: str,
    broker: Broker,
    topic_prefix: str,
    bundle: Path,
    outbox: Path,
    site: str,
    err: Any,
    *extra: str,
) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` (after :data:`_AGENT_PROCESS`) in its own process; killed at exit."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            broker.host,
            str(broker.port),
            topic_prefix,
            str(bundle),
            str(outbox),
            site,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_an_agent_killed_with_sigkill_loses_nothing_and_its_successor_answers_each_once(
    tmp_path, broker, topic_prefix, bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    outbox_path = tmp_path / "killed" / "outbox.db"
    n = 24
    err_path = tmp_path / "agent.err"
    with (
        err_path.open("w") as err,
        _agent_process(
            _KILLED_AGENT, broker, topic_prefix, bundle, outbox_path, "site-k", err, str(n)
        ) as proc,
    ):
        try:
            _wait_for_line(proc, "stored")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{err_path.read_text()[-3000:]}") from None
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL

    deliveries = Deliveries()
    agent = make_agent(
        bundle,
        site="site-k",
        on_answer=deliveries,
        outbox=OutboxConfig(path=outbox_path, **FAST_RETRY),
    )
    assert agent.stats()["outbox_items"] == n
    responder_factory(bundle)
    tags = [f"killed-{i}" for i in range(n)]
    _answers_once_each(deliveries.wait_for(n), tags)
    _no_late_duplicates(agent, deliveries, n)
    assert agent.stats()["evicted"] == 0


_KILLED_AS_IT_ANSWERS = (
    _AGENT_PROCESS
    + """
# The fastest journal there could be: a delete handed to it is committed before put()
# returns. Whichever comes first, handing out the answer or queueing its delete, has then
# happened in full before the other starts: with the delete first, the row is gone by the
# time the answer is out, every time, and not only when the journal thread wins the race.
journal = agent._courier.journal
queue_op = journal.put
def put_and_commit(op):
    queue_op(op)
    if isinstance(op, bytes):  # an answered item's delete
        while not agent.drained():  # the journal is done with it once committed
            time.sleep(0.001)
journal.put = put_and_commit

def killed_as_it_answers(fut):
    # The application keeps the answer, and the process dies before anything else runs.
    print("answered", fut.result().label, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

frame = np.random.default_rng(3).integers(0, 256, (1, 8, 8), dtype=np.uint8)
agent.submit(frame, tag="handed-0").add_done_callback(killed_as_it_answers)
signal.pause()
"""
)


def test_an_agent_killed_as_it_hands_out_an_answer_hands_it_out_again_marked_recovered(
    tmp_path, broker, topic_prefix, bundle_factory, make_agent, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    outbox_path = tmp_path / "handed" / "outbox.db"
    err_path = tmp_path / "agent.err"
    with (
        err_path.open("w") as err,
        _agent_process(
            _KILLED_AS_IT_ANSWERS, broker, topic_prefix, bundle, outbox_path, "site-h", err
        ) as proc,
    ):
        assert proc.wait(60) == -signal.SIGKILL, err_path.read_text()[-3000:]
        assert proc.stdout is not None
        line = proc.stdout.read().strip()
    assert line.startswith("answered "), line
    kept_label = int(line.split()[1])

    # The answer was handed out before its outbox row was deleted: the row is still there.
    deliveries = Deliveries()
    agent = make_agent(
        bundle,
        site="site-h",
        on_answer=deliveries,
        outbox=OutboxConfig(path=outbox_path, **FAST_RETRY),
    )
    assert agent.stats()["outbox_items"] == 1
    (again,) = deliveries.wait_for(1)
    assert again.recovered
    assert again.tag == "handed-0"
    assert again.answer is not None
    assert again.answer.label == kept_label
    _no_late_duplicates(agent, deliveries, 1)
