"""The connection says what happens to it, and no message or callback stops its thread.

Against a real Mosquitto: a handler that raises on one message (the poison message kind
seen in the field: meta JSON nested so deep that decoding raises ``RecursionError``), a
callback that escapes paho's loop, a broker that is not there, killed and restarted, and
two processes sharing one client id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fogline.messaging import Inbound, MqttConnection, MqttSettings, MqttTransportError
from tests.conftest import free_port

WAIT_S = 10.0
LOGGER = "fogline.messaging"


def until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


def settings_for(broker, client_id: str, **kw: object) -> MqttSettings:  # type: ignore[no-untyped-def]
    return MqttSettings(host=broker.host, port=broker.port, client_id=client_id, **kw)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.parametrize("manual_ack", [False, True], ids=["auto-ack", "manual-ack"])
def test_attack_a_poison_message_does_not_stop_the_network_thread(  # type: ignore[no-untyped-def]
    broker, topic_prefix: str, caplog: pytest.LogCaptureFixture, manual_ack: bool
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    topic = f"{topic_prefix}/features"
    got: queue.Queue[bytes] = queue.Queue()

    def handle(payload: bytes) -> None:
        if payload.startswith(b"poison"):
            raise RecursionError("maximum recursion depth exceeded while decoding")
        got.put(payload)

    if manual_ack:
        holder: list[MqttConnection] = []

        def on_inbound(t: str, payload: bytes, inbound: Inbound) -> None:
            handle(payload)
            holder[0].ack(inbound)

        sub = MqttConnection(
            settings_for(broker, "sub"), subscriptions=((topic, 1),), on_inbound=on_inbound
        )
        holder.append(sub)
    else:
        sub = MqttConnection(
            settings_for(broker, "sub"),
            on_message=lambda t, payload: handle(payload),
            subscriptions=((topic, 1),),
        )
    pub = MqttConnection(settings_for(broker, "pub"))
    sub.start()
    pub.start()
    try:
        for body in (b"before", b"poison-1", b"poison-2", b"after"):
            pub.publish(topic, body).wait_for_publish(WAIT_S)
        assert got.get(timeout=WAIT_S) == b"before"
        assert got.get(timeout=WAIT_S) == b"after"
        assert sub.handler_errors == 2
        assert sub.is_connected
        (record,) = messages(caplog, "the handler failed on a message")
        assert topic in record.getMessage()
        assert "RecursionError" in record.getMessage()
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.integration
def test_a_callback_that_escapes_paho_restarts_the_loop_and_traffic_goes_on(  # type: ignore[no-untyped-def]
    broker, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    topic = f"{topic_prefix}/t"
    got: queue.Queue[bytes] = queue.Queue()
    sub = MqttConnection(settings_for(broker, "sub"), on_message=lambda t, p: got.put(p))
    pub = MqttConnection(settings_for(broker, "pub"))
    sub.start()
    pub.start()
    original = sub.client.on_subscribe
    fired = threading.Event()

    def boom(*args: object) -> None:
        # paho re-raises what a callback raises, out of its network loop.
        sub.client.on_subscribe = original
        fired.set()
        raise RuntimeError("a bug in a callback")

    sub.client.on_subscribe = boom
    try:
        sub.subscribe(topic)
        assert fired.wait(WAIT_S)
        assert until(lambda: sub.client.loop_restarts == 1)  # type: ignore[attr-defined]
        assert until(lambda: bool(messages(caplog, "network loop of sub failed; restarting it")))
        # The subscription itself reached the broker before the callback raised.
        assert until(lambda: sub.is_connected)
        pub.publish(topic, b"still-here").wait_for_publish(WAIT_S)
        assert got.get(timeout=WAIT_S) == b"still-here"
    finally:
        pub.stop()
        sub.stop()


def test_a_dead_broker_is_reported_with_its_reason_and_the_retry_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = MqttSettings(
        host="127.0.0.1", port=free_port(), client_id="lonely", connect_timeout_s=2.5
    )
    conn = MqttConnection(settings)
    with pytest.raises(MqttTransportError, match=r"within 2.5 s: .*[Cc]onnection refused"):
        conn.start()
    (first, *_) = messages(caplog, "cannot reach broker")
    assert first.levelno == logging.WARNING
    assert f"127.0.0.1:{settings.port} (attempt 1)" in first.getMessage()
    assert "next attempt in 1 s" in first.getMessage()


@pytest.mark.integration
def test_losing_and_regaining_the_broker_is_logged_on_both_edges(  # type: ignore[no-untyped-def]
    broker, caplog: pytest.LogCaptureFixture
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs a broker process to kill")
    caplog.set_level(logging.INFO, logger=LOGGER)
    conn = MqttConnection(settings_for(broker, "watcher"))
    conn.start()
    try:
        assert messages(caplog, f"connected to broker {broker.host}:{broker.port} as 'watcher'")
        broker.kill()
        assert until(lambda: bool(messages(caplog, "lost the connection to broker")))
        (lost,) = messages(caplog, "lost the connection to broker")
        assert lost.levelno == logging.WARNING
        assert "reconnecting in 1 s" in lost.getMessage()
        broker.start()
        assert until(lambda: bool(messages(caplog, "reconnected to broker")), 20.0)
        (back,) = messages(caplog, "reconnected to broker")
        assert back.levelno == logging.INFO
        assert conn.is_connected
    finally:
        conn.stop()
    # A deliberate stop is not a loss.
    assert len(messages(caplog, "lost the connection")) == 1


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_processes_with_one_client_id_are_warned_about(  # type: ignore[no-untyped-def]
    broker, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only and does not take sessions over")
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = settings_for(broker, "twin", protocol=protocol)
    first = MqttConnection(settings)
    second = MqttConnection(settings)
    first.start()
    second.start(wait=False)
    try:
        # A broker that sends MQTT 5's "Session taken over" is named at once; otherwise (3.1.1,
        # or Mosquitto 2.0.11 even over 5) the run of connections closed right after
        # connecting is what shows it.
        assert until(lambda: first.takeovers + second.takeovers >= 1, 30.0)
        (warning, *_) = messages(caplog, "took over this session") + messages(
            caplog, "probably using client id"
        )
        assert warning.levelno == logging.WARNING
        assert "'twin'" in warning.getMessage()
    finally:
        second.stop()
        first.stop()


def test_a_disconnect_with_reason_session_taken_over_is_named_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The broker's DISCONNECT as paho hands it to the callback; no broker needed.
    caplog.set_level(logging.INFO, logger=LOGGER)
    conn = MqttConnection(MqttSettings(host="127.0.0.1", port=1, client_id="twin", protocol="5"))
    conn._connected.set()
    reason = ReasonCode(PacketTypes.DISCONNECT, identifier=142)
    conn._handle_disconnect(conn.client, None, None, reason, None)
    assert conn.takeovers == 1
    (warning,) = messages(caplog, "took over this session")
    assert warning.levelno == logging.WARNING
    assert "'twin'" in warning.getMessage()
    assert not messages(caplog, "lost the connection")
