"""Fixtures for the cloud worker's integration tests: configs, a plain paho client."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline._mqtt import MqttSettings
from fogline.cloud_service import BatchingConfig, CloudConfig, StoreConfig
from fogline.compression import Codec, Envelope, Kind, decode_message, now_us


class PahoClient:
    """A bare paho client: publishes features, collects whatever arrives on results topics."""

    def __init__(self, host: str, port: int, topic_prefix: str) -> None:
        self.prefix = topic_prefix
        self.received: list[tuple[str, Envelope]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._closed = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the test client could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(f"{self.prefix}/+/results", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            envelopes, error = decode_message(bytes(msg.payload))
            assert error is None, error
            self.received.extend((msg.topic, env) for env in envelopes)
            self._cond.notify_all()

    def publish(self, site: str, payload: bytes) -> None:
        self._client.publish(f"{self.prefix}/{site}/features", payload, qos=1).wait_for_publish(5)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, Envelope]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout_s)
            return list(self.received)

    def result_for(self, env: Envelope, timeout_s: float = 10.0) -> tuple[str, Envelope]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for topic, got in self.received:
                    if got.message_id == env.message_id:
                        return topic, got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no result for {env.message_uuid}")
                self._cond.wait(left)

    def answers_for(self, env: Envelope, count: int, timeout_s: float = 10.0) -> list[Envelope]:
        """Every answer to ``env``'s message id so far, once there are at least ``count``."""

        def answers() -> list[Envelope]:
            return [got for _, got in self.received if got.message_id == env.message_id]

        with self._cond:
            if not self._cond.wait_for(lambda: len(answers()) >= count, timeout_s):
                raise TimeoutError(f"fewer than {count} answers for {env.message_uuid}")
            return answers()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()


def features(
    site: str,
    *,
    bundle: str = "tiny@1",
    seed: int | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> Envelope:
    """A FEATURES envelope for the tiny bundle (16 features, int8 codec)."""
    rng = np.random.default_rng(seed)
    return Envelope(
        kind=Kind.FEATURES,
        message_id=uuid.uuid4().bytes,
        site=site,
        bundle=bundle,
        tensors=tensors
        if tensors is not None
        else {"features": rng.uniform(-1, 1, (1, 16)).astype(np.float32)},
        created_us=now_us(),
        codec=Codec.INT8,
    )


@pytest.fixture
def make_features() -> Callable[..., Envelope]:
    return features


@pytest.fixture
def paho_client(broker: Any, topic_prefix: str) -> Iterator[PahoClient]:
    client = PahoClient(broker.host, broker.port, topic_prefix)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def paho_factory(topic_prefix: str) -> Iterator[Callable[[str, int], PahoClient]]:
    """Clients on any broker (the ``paho_client`` fixture uses the Mosquitto fixture)."""
    clients: list[PahoClient] = []

    def make(host: str, port: int) -> PahoClient:
        clients.append(PahoClient(host, port, topic_prefix))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def cloud_config(
    broker: Any, topic_prefix: str, tiny_bundle: Path, tmp_path: Path
) -> Callable[..., CloudConfig]:
    """A factory of configs for a worker on the test broker, topic prefix and bundle."""

    def make(**overrides: Any) -> CloudConfig:
        batching = overrides.pop("batching", BatchingConfig(max_batch_size=8))
        kwargs: dict[str, Any] = {
            "broker": MqttSettings(host=broker.host, port=broker.port, topic_prefix=topic_prefix),
            "share_group": "fogline-cloud" if broker.supports_shared_subscriptions else None,
            "bundles": (tiny_bundle,),
            "batching": batching,
            "store": StoreConfig(f"sqlite:///{tmp_path / 'results.db'}"),
            "worker_id": f"w-{uuid.uuid4().hex[:6]}",
        }
        kwargs.update(overrides)
        return CloudConfig(**kwargs)

    return make
