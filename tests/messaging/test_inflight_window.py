"""The in-flight window: QoS 1 messages beyond it wait in the client and go out as
acknowledgements free the window, also across a reconnect."""

from __future__ import annotations

import threading
import time

import pytest

from fogline.messaging import MqttConnection, MqttSettings

pytestmark = pytest.mark.integration


def _pair(  # type: ignore[no-untyped-def]
    broker, topic: str, window: int
) -> tuple[MqttConnection, MqttConnection, list[bytes], threading.Event, int]:
    """A subscriber and a publisher whose in-flight window holds ``window`` messages."""
    got: list[bytes] = []
    done = threading.Event()
    want = 40

    def on_message(_topic: str, payload: bytes) -> None:
        got.append(payload)
        if len(set(got) - {b"probe"}) >= want:
            done.set()

    settings = MqttSettings(host=broker.host, port=broker.port)
    sub = MqttConnection(
        settings.with_client_id(f"sub-{window}"), on_message, subscriptions=((topic, 1),)
    )
    pub = MqttConnection(settings.with_client_id(f"pub-{window}"))
    pub.client.max_inflight_messages_set(window)
    return sub, pub, got, done, want


def test_messages_beyond_a_full_window_are_sent_as_acknowledgements_arrive(  # type: ignore[no-untyped-def]
    broker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/window"
    sub, pub, got, done, want = _pair(broker, topic, window=2)
    sub.start()
    pub.start()
    try:
        infos = [pub.publish(topic, b"m%03d" % i, 1) for i in range(want)]
        assert done.wait(10), f"{len(set(got))} of {want} arrived"
        assert sorted(set(got)) == [b"m%03d" % i for i in range(want)]
        # the last acknowledgements may still be on their way back to the publisher
        deadline = time.monotonic() + 10
        while not all(info.is_published() for info in infos) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(info.is_published() for info in infos)
    finally:
        pub.stop()
        sub.stop()


def test_messages_queued_while_the_broker_was_away_are_sent_after_it_returns(  # type: ignore[no-untyped-def]
    broker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/window-reconnect"
    sub, pub, got, done, want = _pair(broker, topic, window=3)
    sub.start()
    pub.start()
    probe = MqttConnection(MqttSettings(host=broker.host, port=broker.port, client_id="probe"))
    try:
        broker.stop()
        deadline = time.monotonic() + 20
        while pub.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pub.client.is_connected()
        # The publisher's network thread is held back while the broker restarts, so that
        # the subscriber is back and subscribed before anything is sent.
        pub.client.stop_network_thread()
        # Published without a connection: all wait, beyond the window, for the reconnect.
        for i in range(want):
            pub.publish(topic, b"m%03d" % i, 1)
        broker.start()
        assert sub.wait_connected(20)
        probe.start()
        deadline = time.monotonic() + 20
        while b"probe" not in got and time.monotonic() < deadline:
            probe.publish(topic, b"probe", 1).wait_for_publish(5)
            time.sleep(0.1)
        assert b"probe" in got
        pub.client.start_network_thread("fogline-test-pub")
        assert done.wait(20), f"{len(set(got) - {b'probe'})} of {want} arrived"
    finally:
        probe.stop()
        pub.stop()
        sub.stop()
