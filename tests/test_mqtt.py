"""Topic scheme, broker URLs and a real connection through Mosquitto."""

from __future__ import annotations

import queue
import socket
import threading

import pytest

from fogline._mqtt import MqttConnection, MqttSettings, Topics, parse_broker_url
from tests.conftest import publish_from_threads


def test_topics_follow_the_documented_scheme() -> None:
    t = Topics("fogline/v1")
    assert t.features("site-a") == "fogline/v1/site-a/features"
    assert t.results("site-a") == "fogline/v1/site-a/results"
    assert t.sync("site-a") == "fogline/v1/site-a/sync"
    assert t.all_features() == "fogline/v1/+/features"
    assert t.all_features("workers") == "$share/workers/fogline/v1/+/features"
    assert t.site_of("fogline/v1/site-a/features") == "site-a"


@pytest.mark.parametrize("site", ["", "a/b", "a+b", "a#"])
def test_sites_that_would_break_topics_are_refused(site: str) -> None:
    with pytest.raises(ValueError, match="site"):
        Topics().features(site)


def test_a_foreign_topic_names_no_site() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topics("fogline/v1").site_of("other/site-a/features")


def test_broker_urls_parse_with_credentials_and_tls() -> None:
    assert parse_broker_url("mqtt://localhost") == {"host": "localhost", "port": 1883, "tls": False}
    got = parse_broker_url("mqtts://user:p%40ss@broker.example:8884")
    assert got == {
        "host": "broker.example",
        "port": 8884,
        "tls": True,
        "username": "user",
        "password": "p@ss",
    }
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url("http://x")


def test_settings_never_print_the_password() -> None:
    s = MqttSettings(username="u", password="hunter2")
    assert "hunter2" not in repr(s)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_message_round_trips_through_the_broker(broker, topic_prefix: str, protocol: str) -> None:  # type: ignore[no-untyped-def]
    if protocol == "5" and broker.kind != "mosquitto":
        pytest.skip("the embedded broker speaks MQTT 3.1.1 only")
    got: list[tuple[str, bytes]] = []
    arrived = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        arrived.set()

    settings = MqttSettings(host=broker.host, port=broker.port, protocol=protocol)  # type: ignore[arg-type]
    sub = MqttConnection(
        settings.with_client_id("sub"), on_message, subscriptions=((f"{topic_prefix}/x", 1),)
    )
    pub = MqttConnection(settings.with_client_id("pub"))
    sub.start()
    pub.start()
    try:
        pub.publish(f"{topic_prefix}/x", b"hello").wait_for_publish(5)
        assert arrived.wait(5)
        assert got == [(f"{topic_prefix}/x", b"hello")]
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.integration
def test_large_messages_published_from_many_threads_arrive_whole(broker, topic_prefix: str) -> None:  # type: ignore[no-untyped-def]
    # Publishers write to the socket themselves. Messages far larger than a small send
    # buffer force partial writes: interleaved bytes would break the stream, a stranded
    # remainder would never arrive.
    got: queue.Queue[bytes] = queue.Queue()
    settings = MqttSettings(host=broker.host, port=broker.port)
    topic = f"{topic_prefix}/big"
    sub = MqttConnection(
        settings.with_client_id("sub"), lambda _t, p: got.put(p), subscriptions=((topic, 1),)
    )
    pub = MqttConnection(settings.with_client_id("pub"))
    sub.start()
    pub.start()
    pub.client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    try:
        sent = publish_from_threads(pub, topic, threads=4, each=6, size=128 * 1024)
        received = [got.get(timeout=30) for _ in sent]
        assert sorted(received) == sorted(sent)
        assert got.empty()
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.integration
def test_a_publish_is_written_by_the_thread_that_publishes(broker, topic_prefix: str) -> None:  # type: ignore[no-untyped-def]
    # No hand-over to the network thread: the packet has left paho's queue by the time
    # publish() returns.
    pub = MqttConnection(MqttSettings(host=broker.host, port=broker.port, client_id="pub"))
    pub.start()
    try:
        written = []
        for i in range(50):
            pub.publish(f"{topic_prefix}/x", str(i).encode())
            written.append(not pub.client.want_write())
        assert all(written)
    finally:
        pub.stop()
