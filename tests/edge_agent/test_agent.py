"""The agent end to end against a real Mosquitto and a stand-in cloud worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import wait

import numpy as np
import pytest

from fogline._broker import free_port
from fogline.compression import Codec, Envelope, Kind, encode_envelope
from fogline.edge_agent import (
    Agent,
    Answer,
    BreakerConfig,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    InputError,
    NotRunningError,
    OutboxConfig,
    OutboxInUseError,
)
from tests.edge_agent.conftest import cloud_labels, edge_outputs, frames

pytestmark = pytest.mark.integration

FORWARD_ALL = {"relevance": 0.0, "exit_confidence": 1.0}


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_forwarded_items_are_answered_by_the_cloud_with_the_right_label(
    broker, bundle_factory, agent_factory, responder_factory, topic_prefix, protocol
) -> None:
    if protocol == "5" and broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle, protocol=protocol)
    agent = agent_factory(bundle, protocol=protocol, codec="fp32")
    batch = frames(12)
    answers = [f.result(10) for f in agent.submit_batch(batch)]

    expected = cloud_labels(bundle, batch)
    assert [a.source for a in answers] == ["cloud"] * 12
    assert [a.label for a in answers] == expected.tolist()
    assert len(set(expected.tolist())) > 1  # the check can tell answers apart
    for a in answers:
        assert a.worker == "responder-1"
        assert a.bundle == "tiny@1"
        assert a.thresholds.relevance == 0.0
        assert a.thresholds.exit_confidence == 1.0
        assert a.confidence is not None
        assert 0.0 < a.confidence <= 1.0
        assert a.message_id is not None
        assert uuid.UUID(hex=a.message_id).version == 4
        assert a.latency_ms > 0
    assert len({a.message_id for a in answers}) == 12


def test_feature_envelopes_carry_the_decision_and_its_inputs(
    bundle_factory, agent_factory, responder_factory, topic_prefix
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    cloud = responder_factory(bundle)
    agent = agent_factory(bundle, site="site-b")
    batch = frames(4, seed=3)
    answers = [f.result(10) for f in agent.submit_batch(batch)]
    heads = edge_outputs(bundle, batch)

    by_id = {env.message_id.hex(): (topic, env) for topic, env, _ in cloud.received}
    for i, answer in enumerate(answers):
        topic, env = by_id[answer.message_id]  # type: ignore[index]
        assert topic == f"{topic_prefix}/site-b/features"
        assert env.kind is Kind.FEATURES
        assert env.site == "site-b"
        assert env.bundle == "tiny@1"
        assert env.codec is Codec.INT8  # the bundle's codec
        assert env.meta["decision"] == "forward"
        assert env.meta["relevance"] == pytest.approx(float(heads["relevance"][i, 0]), abs=1e-6)
        assert env.meta["exit_confidence"] == pytest.approx(
            float(heads["exit_probs"][i].max()), abs=1e-6
        )
        assert env.tensors["features"].shape == (1, 16)
        np.testing.assert_allclose(env.tensors["features"][0], heads["features"][i], atol=0.02)
        assert env.created_us > 0
        assert answer.relevance == pytest.approx(env.meta["relevance"])
        assert answer.label == cloud.labels[env.message_id]
    stats = agent.stats()
    assert stats["bytes_sent"] == sum(size for _, _, size in cloud.received)
    assert stats["bytes_raw"] == batch.nbytes
    assert stats["forwarded"] == stats["cloud_answers"] == 4


def test_a_batch_travels_in_one_message_and_its_joined_answers_are_all_taken(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    cloud = responder_factory(bundle)
    cloud.join_results = True
    agent = agent_factory(bundle)
    answers = [f.result(10) for f in agent.submit_batch(frames(6, seed=5))]

    assert [a.source for a in answers] == ["cloud"] * 6
    assert [a.label for a in answers] == [
        cloud.labels[bytes.fromhex(a.message_id)]  # type: ignore[arg-type]
        for a in answers
    ]
    sizes = [size for _t, _env, size in cloud.received]
    assert len(sizes) == 6
    assert sum(1 for size in sizes if size) == 1  # one message carried the six
    assert agent.stats()["bytes_sent"] == sum(sizes)
    assert agent.stats()["cloud_answers"] == 6


def test_dropped_and_early_exit_items_never_reach_the_broker(
    bundle_factory, agent_factory, spy
) -> None:
    batch = frames(10, seed=5)
    dropping = agent_factory(bundle_factory(relevance=1.0, exit_confidence=0.0), site="drop")
    exiting_bundle = bundle_factory(relevance=0.0, exit_confidence=0.0)
    exiting = agent_factory(exiting_bundle, site="exit")

    dropped = [f.result(5) for f in dropping.submit_batch(batch)]
    local = [f.result(5) for f in exiting.submit_batch(batch)]

    assert all(a.source == "dropped" and a.decision == "drop" for a in dropped)
    assert all(a.label is None and a.confidence is None for a in dropped)
    assert all(a.message_id is None for a in dropped)
    probs = edge_outputs(exiting_bundle, batch)["exit_probs"]
    assert [a.source for a in local] == ["edge"] * 10
    assert [a.label for a in local] == np.argmax(probs, axis=1).tolist()
    assert [a.confidence for a in local] == pytest.approx(probs.max(axis=1).tolist())
    time.sleep(0.2)
    assert spy.messages == []
    for agent in (dropping, exiting):
        stats = agent.stats()
        assert stats["forwarded"] == 0
        assert stats["bytes_sent"] == 0
        assert stats["inputs"] == 10
    assert dropping.stats()["dropped"] == 10
    assert exiting.stats()["edge"] == 10


def test_local_answers_keep_coming_while_the_broker_is_down(
    broker, bundle_factory, agent_factory
) -> None:
    agent = agent_factory(bundle_factory(relevance=0.0, exit_confidence=0.0))
    broker.kill()
    assert _wait_until(lambda: not agent.connected)
    answers = [f.result(5) for f in agent.submit_batch(frames(5))]
    assert [a.source for a in answers] == ["edge"] * 5
    assert not agent.ready


def test_a_malformed_result_is_counted_and_the_agent_keeps_working(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    cloud = responder_factory(bundle)
    agent = agent_factory(bundle)
    good = encode_envelope(
        Envelope(
            kind=Kind.RESULT,
            message_id=uuid.uuid4().bytes,
            site="site-a",
            bundle="tiny@1",
            meta={"status": "ok", "label": 1},
        )
    )
    cloud.publish_raw("site-a", b"not an envelope at all " * 4)
    cloud.publish_raw("site-a", good[:2] + bytes([99]) + good[3:])  # unknown version
    foreign = encode_envelope(
        Envelope(
            kind=Kind.RESULT,
            message_id=uuid.uuid4().bytes,
            site="elsewhere",
            bundle="tiny@1",
            meta={"status": "ok", "label": 1},
        )
    )
    cloud.publish_raw("site-a", foreign)
    assert _wait_until(lambda: agent.stats()["rejected"] == 3)

    answer = agent.submit_batch(frames(1))[0].result(10)
    assert answer.source == "cloud"
    m = agent.metrics
    assert m.value("fogline_agent_rejected_total", {"reason": "bad_magic"}) == 1
    assert m.value("fogline_agent_rejected_total", {"reason": "unknown_version"}) == 1
    assert m.value("fogline_agent_rejected_total", {"reason": "foreign_site"}) == 1


def test_a_late_or_duplicate_result_is_counted_and_ignored(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle, duplicate=True)
    agent = agent_factory(bundle)
    answers = [f.result(10) for f in agent.submit_batch(frames(3))]
    assert [a.source for a in answers] == ["cloud"] * 3
    assert _wait_until(lambda: agent.stats()["duplicates_suppressed"] == 3)
    assert agent.stats()["cloud_answers"] == 3
    assert agent.stats()["rejected"] == 0


def test_without_a_cloud_callers_get_a_timeout_and_the_items_stay_in_the_outbox(
    bundle_factory, agent_factory
) -> None:
    agent = agent_factory(
        bundle_factory(**FORWARD_ALL),
        cloud_timeout_ms=200,
        breaker=BreakerConfig(offline="fail"),
    )
    futures = agent.submit_batch(frames(3))
    for fut in futures:
        with pytest.raises(CloudTimeoutError, match="within 200 ms"):
            fut.result(10)
    stats = agent.stats()
    assert stats["timeouts"] == 3
    assert stats["pending"] == 3
    assert stats["outbox_items"] == 3


def test_without_a_cloud_callers_get_the_edge_answer_marked_degraded(
    bundle_factory, agent_factory
) -> None:
    agent = agent_factory(bundle_factory(**FORWARD_ALL), cloud_timeout_ms=200)
    answers = [f.result(10) for f in agent.submit_batch(frames(3))]
    assert {a.status for a in answers} == {"degraded"}
    assert {a.source for a in answers} == {"edge"}
    assert {a.decision for a in answers} == {"forward"}
    assert all(a.label is not None and a.message_id for a in answers)
    assert agent.stats()["degraded"] == 3


def test_a_busy_cloud_makes_the_agent_keep_the_item_and_retry_after_the_hint(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    cloud = responder_factory(bundle, busy_first=2)
    agent = agent_factory(
        bundle, outbox=OutboxConfig(retry_initial_ms=5000), cloud_timeout_ms=20_000
    )
    answer = agent.submit_batch(frames(1))[0].result(15)
    assert answer.source == "cloud"
    assert answer.status == "ok"
    stats = agent.stats()
    assert stats["cloud_busy"] == 2
    assert stats["resends"] == 2
    assert len(cloud.received) == 3
    assert {env.message_id for _t, env, _n in cloud.received} == {bytes.fromhex(answer.message_id)}
    assert _wait_until(lambda: agent.stats()["outbox_items"] == 0)


def test_a_cloud_that_stays_busy_ends_the_wait_with_a_busy_error(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle, mode="busy")
    agent = agent_factory(bundle, cloud_timeout_ms=500, breaker=BreakerConfig(offline="fail"))
    with pytest.raises(CloudBusyError, match="busy"):
        agent.submit_batch(frames(1))[0].result(10)
    assert agent.stats()["cloud_busy"] >= 1
    assert agent.stats()["outbox_items"] == 1


def test_a_cloud_error_becomes_a_clear_error(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle, mode="error")
    agent = agent_factory(bundle)
    with pytest.raises(CloudFailedError, match="backend exploded"):
        agent.submit_batch(frames(1))[0].result(10)
    assert agent.stats()["cloud_errors"] == 1


def test_async_infer_awaits_cloud_answers_on_the_callers_loop(
    bundle_factory, agent_factory, responder_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    agent = agent_factory(bundle, codec="fp32")
    batch = frames(8, seed=9)

    async def main() -> list[Answer]:
        return await asyncio.gather(*(agent.infer(frame) for frame in batch))

    answers = asyncio.run(main())
    assert [a.source for a in answers] == ["cloud"] * 8
    assert [a.label for a in answers] == cloud_labels(bundle, batch).tolist()


def test_single_submissions_accept_a_frame_without_its_channel_axis(
    bundle_factory, agent_factory
) -> None:
    agent = agent_factory(bundle_factory(relevance=0.0, exit_confidence=0.0))
    batch = frames(2)
    answer = agent.submit(batch[0, 0]).result(5)  # 8×8 for a [1, 8, 8] input
    assert answer.source == "edge"
    with pytest.raises(InputError, match=r"does not match the model input \[1, 8, 8\]"):
        agent.submit(np.zeros((9, 9), dtype=np.uint8))
    with pytest.raises(InputError, match="float32"):
        agent.submit(np.zeros((1, 8, 8), dtype=np.float32))


def test_stopping_fails_waiting_callers_keeps_their_items_and_refuses_new_ones(
    bundle_factory, agent_factory
) -> None:
    agent = agent_factory(bundle_factory(**FORWARD_ALL), cloud_timeout_ms=60_000)
    futures = agent.submit_batch(frames(2))
    agent.stop()
    done, _ = wait(futures, timeout=5)
    assert len(done) == 2
    for fut in futures:
        with pytest.raises(NotRunningError, match="stopped"):
            fut.result()
    with pytest.raises(NotRunningError):
        agent.submit_batch(frames(1))
    with pytest.raises(NotRunningError):
        agent.submit(frames(1)[0])


def test_an_agent_started_without_its_broker_connects_when_the_broker_appears(
    broker, bundle_factory, agent_factory
) -> None:
    broker.stop()
    agent = agent_factory(bundle_factory(relevance=0.0, exit_confidence=0.0), wait_connected=False)
    assert agent.model_ready
    assert not agent.ready
    assert agent.submit(frames(1)[0]).result(5).source == "edge"
    broker.start()
    assert _wait_until(lambda: agent.ready, timeout_s=15)


def test_agents_in_one_process_keep_their_own_metrics(bundle_factory, agent_factory) -> None:
    bundle = bundle_factory(relevance=1.0, exit_confidence=1.0)
    a = agent_factory(bundle, site="a")
    b = agent_factory(bundle, site="b")
    [f.result(5) for f in a.submit_batch(frames(3))]
    [f.result(5) for f in b.submit_batch(frames(5))]
    assert a.stats()["inputs"] == 3
    assert b.stats()["inputs"] == 5
    assert a.registry is not b.registry


def test_queued_single_inputs_are_batched_and_all_answered(bundle_factory, agent_factory) -> None:
    agent = agent_factory(bundle_factory(relevance=0.5, exit_confidence=0.0))
    batch = frames(40, seed=11)
    singles = [agent.submit(frame).result(5) for frame in batch]
    together = [f.result(5) for f in agent.submit_batch(batch)]
    assert [a.source for a in singles] == [a.source for a in together]
    assert agent.stats()["inputs"] == 80


def test_a_second_start_is_refused(bundle_factory, agent_factory) -> None:
    agent: Agent = agent_factory(bundle_factory())
    with pytest.raises(NotRunningError, match="already started"):
        agent.start()


def test_an_unreachable_broker_fails_start_when_asked_to_wait(
    bundle_factory, agent_factory
) -> None:
    from fogline._mqtt import MqttSettings
    from fogline.edge_agent import AgentConfig, BrokerError

    config = AgentConfig(
        site="x",
        bundle_dir=bundle_factory(),
        broker=MqttSettings(port=free_port(), connect_timeout_s=0.5),
    )
    agent = Agent(config)
    with pytest.raises(BrokerError, match="no connection to broker"):
        agent.start()
    assert not agent.running


def test_replacing_the_loaded_bundle_value_changes_what_the_next_batch_runs_against(
    bundle_factory, agent_factory, responder_factory
) -> None:
    import dataclasses

    from fogline.sync import Thresholds

    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    agent = agent_factory(bundle)
    before = [f.result(10) for f in agent.submit_batch(frames(4))]
    assert [a.source for a in before] == ["cloud"] * 4
    # The one attribute a hot swap replaces: thresholds, codec, runtime and bundle id
    # travel together, and every reader sees the new value.
    swapped = dataclasses.replace(agent._loaded, thresholds=Thresholds(0.0, 0.0))
    agent._loaded = swapped
    after = [f.result(10) for f in agent.submit_batch(frames(4, seed=1))]
    assert [a.source for a in after] == ["edge"] * 4  # every head is confident enough now
    assert {a.thresholds for a in after} == {Thresholds(0.0, 0.0)}
    assert agent.thresholds == Thresholds(0.0, 0.0)
    assert agent.info()["thresholds"] == {"relevance": 0.0, "exit_confidence": 0.0}
    assert agent.input_spec is swapped.runtime.input  # type: ignore[union-attr]


def test_a_second_agent_with_the_same_configuration_is_refused_at_start(
    bundle_factory, agent_factory
) -> None:
    bundle = bundle_factory(**FORWARD_ALL)
    first = agent_factory(bundle)
    second = agent_factory(bundle, start=False)
    with pytest.raises(OutboxInUseError, match="in use by another agent"):
        second.start()
    assert not second.running
    assert first.ready
    # Once the first has stopped, an agent with the same configuration starts on its outbox.
    first.stop()
    third = agent_factory(bundle)
    assert third.running


@pytest.mark.parametrize("priority", [2**63, -(2**31) - 1, 2**31, True, 1.5])
def test_a_priority_outside_the_outbox_range_is_refused_at_the_door(
    bundle_factory, agent_factory, priority: object
) -> None:
    agent = agent_factory(bundle_factory(**FORWARD_ALL))
    # A value of the wrong type is a TypeError, one out of range a ValueError.
    with pytest.raises((TypeError, ValueError), match="priority must be"):
        agent.submit(frames(1)[0], priority=priority)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="priority must be"):
        agent.submit_batch(frames(2), priority=priority)  # type: ignore[arg-type]


def test_a_resent_envelope_carries_the_resent_flag_and_the_first_send_does_not(
    bundle_factory, agent_factory, responder_factory
) -> None:
    # The flag tells a worker to look for an earlier answer first; without it a re-sent
    # item that another worker already stored would be run and stored again.
    bundle = bundle_factory(**FORWARD_ALL)
    responder = responder_factory(bundle, busy_first=1)  # busy, retry after 250 ms
    agent = agent_factory(bundle)
    answer = agent.submit_batch(frames(1))[0].result(15)
    assert answer.source == "cloud"
    sent = [env for _topic, env, _size in responder.received]
    assert len(sent) == 2
    assert sent[0].message_id == sent[1].message_id
    assert not sent[0].resent
    assert sent[1].resent
