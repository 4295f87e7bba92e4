"""MQTT 5 publish properties through a real broker; MQTT 3.1.1 still works without them."""

from __future__ import annotations

import threading

import pytest

from fogline.messaging import MqttConnection, MqttSettings, Received


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_expiry_and_user_properties_reach_a_5_client_and_3_1_1_still_delivers(  # type: ignore[no-untyped-def]
    broker, topic_prefix: str, protocol: str
) -> None:
    if protocol == "5" and broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    got: list[Received] = []
    arrived = threading.Event()

    def on_received(msg: Received) -> None:
        got.append(msg)
        arrived.set()

    settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]
    topic = f"{topic_prefix}/p"
    sub = MqttConnection(
        settings.with_client_id("sub"), subscriptions=((topic, 1),), on_received=on_received
    )
    pub = MqttConnection(settings.with_client_id("pub"))
    sub.start()
    pub.start()
    try:
        pub.publish(
            topic, b"hi", expiry_s=60, user_properties=[("bundle", "b1"), ("k", "v")]
        ).wait_for_publish(5)
        assert arrived.wait(5)
        (msg,) = got
        assert msg.payload == b"hi"
        if protocol == "5":
            assert msg.expiry_s is not None
            assert 0 < msg.expiry_s <= 60
            assert msg.user_properties == (("bundle", "b1"), ("k", "v"))
        else:
            assert msg.expiry_s is None
            assert msg.user_properties == ()
    finally:
        pub.stop()
        sub.stop()
