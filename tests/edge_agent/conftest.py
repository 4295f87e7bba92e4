"""Fixtures for the edge agent: bundles with chosen thresholds, agents, a stand-in cloud."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fogline._mqtt import MqttSettings
from fogline.compression import Codec, Envelope, Kind, decode_message, encode_envelope
from fogline.edge_agent import Agent, AgentConfig, RuntimeConfig
from tests.conftest import make_tiny_bundle

BundleFactory = Callable[..., Path]
AgentFactory = Callable[..., Agent]


def frames(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random 8×8 uint8 frames in the tiny bundle's input layout [n, 1, 8, 8]."""
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def edge_outputs(bundle: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(bundle / "edge.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"frame": batch}), strict=True))


def cloud_labels(bundle: Path, batch: np.ndarray) -> np.ndarray:
    """What the full model (edge, then cloud, in fp32) answers for each frame."""
    feats = edge_outputs(bundle, batch)["features"]
    sess = ort.InferenceSession(str(bundle / "cloud.onnx"), providers=["CPUExecutionProvider"])
    probs = sess.run(["probs"], {"features": feats})[0]
    return np.argmax(probs, axis=1)


class CloudResponder:
    """A stand-in cloud worker: a plain paho client that answers FEATURES envelopes.

    It runs the bundle's ``cloud.onnx`` on the received features and publishes a RESULT to
    the site's result topic. ``mode`` makes it answer ``busy`` or ``error`` instead;
    ``duplicate`` sends every result twice; ``busy_first`` answers the first n messages
    ``busy``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_prefix: str,
        bundle: Path,
        *,
        protocol: str = "3.1.1",
        mode: str = "ok",
        duplicate: bool = False,
        busy_first: int = 0,
    ) -> None:
        self.topic_prefix = topic_prefix
        self.mode = mode
        self.duplicate = duplicate
        self.busy_left = busy_first
        # Answer the envelopes of one message with one message, as a worker answers a batch.
        self.join_results = False
        self.received: list[tuple[str, Envelope, int]] = []
        self.labels: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._session = ort.InferenceSession(
            str(bundle / "cloud.onnx"), providers=["CPUExecutionProvider"]
        )
        self._subscribed = threading.Event()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"cloud-responder-{time.monotonic_ns()}",
            protocol=proto,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the cloud responder did not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(f"{self.topic_prefix}/+/features", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        envelopes, error = decode_message(payload)
        assert error is None, error
        # A message's bytes are counted once, with its first envelope.
        results = [
            self._answer(msg.topic, env, len(payload) if k == 0 else 0)
            for k, env in enumerate(envelopes)
        ]
        if self.join_results and results:
            results = [(results[0][0], b"".join(out for _t, out in results))]
        for topic, out in results:
            for _ in range(2 if self.duplicate else 1):
                client.publish(topic, out, qos=1)

    def _answer(self, topic: str, env: Envelope, size: int) -> tuple[str, bytes]:
        with self._lock:
            self.received.append((topic, env, size))
        meta: dict[str, Any]
        tensors: dict[str, np.ndarray] = {}
        with self._lock:
            busy = self.mode == "busy" or self.busy_left > 0
            self.busy_left = max(0, self.busy_left - 1)
        if busy:
            meta = {"status": "busy", "retry_after_ms": 250}
        elif self.mode == "error":
            meta = {"status": "error", "error": "backend exploded"}
        else:
            t0 = time.perf_counter()
            probs = self._session.run(["probs"], {"features": env.tensors["features"]})[0]
            label = int(np.argmax(probs[0]))
            with self._lock:
                self.labels[env.message_id] = label
            meta = {
                "status": "ok",
                "label": label,
                "confidence": float(probs[0, label]),
                "queue_ms": 0.0,
                "compute_ms": (time.perf_counter() - t0) * 1000,
            }
            tensors = {"probs": probs}
        meta["worker"] = "responder-1"
        result = Envelope(
            kind=Kind.RESULT,
            message_id=env.message_id,
            site=env.site,
            bundle=env.bundle,
            tensors=tensors,
            meta=meta,
            created_us=env.created_us,
            codec=Codec.FP16,
        )
        return f"{self.topic_prefix}/{env.site}/results", encode_envelope(result, compress=False)

    def publish_raw(self, site: str, payload: bytes) -> None:
        self.client.publish(f"{self.topic_prefix}/{site}/results", payload, qos=1).wait_for_publish(
            5
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def bundle_factory(tmp_path: Path) -> BundleFactory:
    """Make a tiny bundle with chosen thresholds: ``bundle_factory(relevance=0.0, …)``."""
    count = 0

    def make(**kwargs: Any) -> Path:
        nonlocal count
        count += 1
        return make_tiny_bundle(tmp_path / f"bundle-{count}", **kwargs)

    return make


@pytest.fixture
def agent_factory(broker: Any, topic_prefix: str) -> Iterator[AgentFactory]:
    """Start agents against the test broker; every one is stopped at teardown."""
    agents: list[Agent] = []

    def make(
        bundle: Path,
        *,
        site: str = "site-a",
        protocol: str = "3.1.1",
        start: bool = True,
        wait_connected: bool = True,
        port: int | None = None,
        **overrides: Any,
    ) -> Agent:
        settings = MqttSettings(
            host=broker.host,
            port=port or broker.port,
            protocol=protocol,  # type: ignore[arg-type]
            topic_prefix=topic_prefix,
            reconnect_min_s=1,
            reconnect_max_s=1,
            connect_timeout_s=10,
        )
        overrides.setdefault("runtime", RuntimeConfig(max_batch=16, warmup_runs=1))
        config = AgentConfig(site=site, bundle_dir=bundle, broker=settings, **overrides)
        agent = Agent(config)
        agents.append(agent)
        if start:
            agent.start(wait_connected=wait_connected)
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def responder_factory(broker: Any, topic_prefix: str) -> Iterator[Callable[..., CloudResponder]]:
    """Start stand-in cloud workers on the test broker; closed at teardown."""
    made: list[CloudResponder] = []

    def make(bundle: Path, **kwargs: Any) -> CloudResponder:
        r = CloudResponder(broker.host, broker.port, topic_prefix, bundle, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


class Spy:
    """Records every message under a topic filter (to prove nothing was published)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: list[str] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"spy-{time.monotonic_ns()}",
        )
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, msg: self.messages.append(msg.topic)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the spy did not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def spy(broker: Any, topic_prefix: str) -> Iterator[Spy]:
    """Sees everything published under the test's topic prefix."""
    s = Spy(broker.host, broker.port, f"{topic_prefix}/#")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own state directory, so agents never share an outbox."""
    state = tmp_path / "state"
    monkeypatch.setenv("FOGLINE_STATE_DIR", str(state))
    return state


SmallFs = Callable[[str], Path]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """Mount a tmpfs of a given size (``small_fs("512k")``): a real file system that fills
    up. Skips where the kernel refuses the mount (not root, no tmpfs); unmounted at
    teardown."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs-{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(where: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``where``."""
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def fill(where: Path, leave: int) -> Path:
    """Write a filler file on ``where``'s file system until only ``leave`` bytes are free
    (to a block); returns it, so a test can delete it to give the space back."""
    filler = where / "filler"
    with filler.open("ab", buffering=0) as f:
        while (room := free_bytes(where) - leave) > 0:
            try:
                f.write(b"\0" * min(room, 1 << 20))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # Something else on the file system (the agent under test) wrote meanwhile:
                # give back what it was meant to have.
                f.seek(0, os.SEEK_END)
                f.truncate(max(0, f.tell() - leave))
                break
    return filler
