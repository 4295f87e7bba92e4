"""The cloud worker through a real Mosquitto: answers, rejections, errors and overload."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fogline.cloud_service import (
    Backend,
    BatchingConfig,
    BrokerError,
    CloudConfig,
    CloudWorker,
    ConfigError,
    OnnxRuntimeBackend,
)
from fogline.compression import Codec, Envelope, Kind, decode_envelope, encode_envelope
from fogline.sync import Bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def started() -> Iterator[Callable[..., CloudWorker]]:
    """Start workers and always stop them."""
    workers: list[CloudWorker] = []

    def start(config: CloudConfig, **kw: object) -> CloudWorker:
        worker = CloudWorker(config, **kw)  # type: ignore[arg-type]
        workers.append(worker)
        return worker.start()

    yield start
    for w in workers:
        w.stop()


def test_worker_answers_each_site_on_its_own_result_topic(
    started, cloud_config, paho_client, make_features, tiny_bundle: Path, topic_prefix: str
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    assert worker.ready
    sent = {
        site: [make_features(site, seed=i + (100 if site == "site-b" else 0)) for i in range(12)]
        for site in ("site-a", "site-b")
    }
    for site, envs in sent.items():
        for env in envs:
            paho_client.publish(site, encode_envelope(env))

    cloud = ort.InferenceSession(str(tiny_bundle / "cloud.onnx"))
    for site, envs in sent.items():
        for env in envs:
            topic, got = paho_client.result_for(env)
            assert topic == f"{topic_prefix}/{site}/results"
            assert got.kind is Kind.RESULT
            assert (got.site, got.bundle) == (site, "tiny@1")
            # The worker sees the features as decoded from the wire (int8-quantized).
            wire = decode_envelope(encode_envelope(env)).tensors["features"]
            (expected,) = cloud.run(["probs"], {"features": wire})
            assert got.meta["status"] == "ok"
            assert got.meta["label"] == int(np.argmax(expected[0]))
            assert got.meta["confidence"] == pytest.approx(float(expected[0].max()), abs=1e-3)
            assert got.meta["worker"] == worker.worker_id
            assert got.meta["queue_ms"] >= 0
            assert got.meta["compute_ms"] >= 0
            np.testing.assert_allclose(got.tensors["probs"], expected[0], atol=2e-3)
            assert got.created_us == env.created_us

    assert worker.flush(10)
    assert worker.store is not None
    assert worker.store.count() == 24
    env = sent["site-b"][3]
    stored = worker.store.get("site-b", env.message_id)
    assert stored is not None
    assert stored.worker == worker.worker_id
    assert stored.created_us == env.created_us <= stored.received_us <= stored.completed_us
    assert worker.metrics.value("fogline_cloud_received_total") == 24
    assert worker.metrics.value("fogline_cloud_results_total", {"status": "ok"}) == 24
    assert worker.metrics.value("fogline_cloud_batch_size_count") >= 3  # batches of ≤ 8


def test_malformed_and_unknown_version_envelopes_are_counted_and_serving_goes_on(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    future = bytearray(encode_envelope(make_features("site-a")))
    future[2] = 9  # envelope version 9
    corrupt = bytearray(encode_envelope(make_features("site-a")))
    corrupt[-1] ^= 0xFF
    as_result = encode_envelope(
        Envelope(Kind.RESULT, make_features("site-a").message_id, "site-a", "tiny@1")
    )
    wrong_site = encode_envelope(make_features("site-b"))
    for payload in (b"garbage", bytes(future), bytes(corrupt), as_result, wrong_site):
        paho_client.publish("site-a", payload)
    good = make_features("site-a")
    paho_client.publish("site-a", encode_envelope(good))

    _, got = paho_client.result_for(good)
    assert got.meta["status"] == "ok"
    assert paho_client.wait_for(1) == [(paho_client.received[0][0], got)]  # nothing else
    rejected = {
        reason: worker.metrics.value("fogline_cloud_rejected_total", {"reason": reason})
        for reason in (
            "truncated",
            "unknown_version",
            "bad_checksum",
            "wrong_kind",
            "site_mismatch",
        )
    }
    assert rejected == dict.fromkeys(rejected, 1.0)
    assert worker.metrics.value("fogline_cloud_received_total") == 6


def test_a_message_joining_several_items_answers_each_and_is_acknowledged_once(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    envs = [make_features("site-a", seed=i) for i in range(5)]
    frames = [encode_envelope(env) for env in envs]
    # the same item twice in one message, then a broken tail
    paho_client.publish("site-a", b"".join([*frames, frames[0], b"\x00" * 3]))

    answers = [paho_client.result_for(env)[1] for env in envs]
    assert [a.meta["status"] for a in answers] == ["ok"] * 5
    assert worker.flush(10)
    # The copy waits for the run of its original (one answer), or, when that run already
    # ended, is answered again from memory.
    dups = {
        source: worker.metrics.value(
            "fogline_cloud_duplicates_suppressed_total", {"source": source}
        )
        for source in ("in_flight", "memory")
    }
    assert sum(dups.values()) == 1
    assert len(paho_client.wait_for(6, timeout_s=1.0)) == 5 + dups["memory"]
    assert worker.metrics.value("fogline_cloud_received_total") == 1
    assert worker.metrics.value("fogline_cloud_rejected_total", {"reason": "truncated"}) == 1
    # one PUBACK, given once every item in the message was finished with
    assert worker.metrics.value("fogline_cloud_acks_pending") == 0
    assert worker.store is not None
    assert worker.store.count() == 5


def test_an_unknown_bundle_gets_an_error_result(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    env = make_features("site-a", bundle="nope@9")
    paho_client.publish("site-a", encode_envelope(env))
    topic, got = paho_client.result_for(env)
    assert topic.endswith("/site-a/results")
    assert got.meta["status"] == "error"
    assert got.meta["error"] == "unknown bundle 'nope@9'"
    assert got.tensors == {}
    assert worker.metrics.value("fogline_cloud_results_total", {"status": "error"}) == 1


def test_features_the_cloud_part_cannot_use_get_an_error_result(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    started(cloud_config())
    missing = make_features("site-a", tensors={"other": np.zeros((1, 16), np.float32)})
    unbatched = make_features("site-a", tensors={"features": np.zeros((2, 16), np.float32)})
    wrong_width = make_features("site-a", tensors={"features": np.zeros((1, 5), np.float32)})
    good = make_features("site-a")
    for env in (missing, unbatched, wrong_width, good):
        paho_client.publish("site-a", encode_envelope(env))
    assert "lack tensor 'features'" in paho_client.result_for(missing)[1].meta["error"]
    assert "leading axis of 1" in paho_client.result_for(unbatched)[1].meta["error"]
    assert "inference failed" in paho_client.result_for(wrong_width)[1].meta["error"]
    assert paho_client.result_for(good)[1].meta["status"] == "ok"


class GatedBackend:
    """The real onnxruntime backend, held at the gate until the test opens it."""

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.warm = False

    @property
    def name(self) -> str:
        return "gated"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.warm:
            self.entered.set()
            self.gate.wait(10)
        return self.inner.run(inputs)

    def warmup(self) -> None:
        self.inner.warmup()
        self.warm = True


def test_a_full_queue_answers_busy_with_a_retry_hint(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    gated: list[GatedBackend] = []

    def load(bundle: Bundle) -> Backend:
        gated.append(GatedBackend(OnnxRuntimeBackend(bundle.cloud_model_path)))
        return gated[0]

    batching = BatchingConfig(
        max_batch_size=1, max_queue_delay_ms=0, max_queue_items=1, busy_retry_after_ms=77
    )
    worker = started(cloud_config(batching=batching), backend_loader=load)
    first, second, third = (make_features("site-a") for _ in range(3))
    paho_client.publish("site-a", encode_envelope(first))
    assert gated[0].entered.wait(10)  # the first item is in the backend, held
    paho_client.publish("site-a", encode_envelope(second))  # waits in the queue
    paho_client.publish("site-a", encode_envelope(third))  # finds the queue full
    _, busy = paho_client.result_for(third)
    assert busy.meta == {"status": "busy", "retry_after_ms": 77, "worker": worker.worker_id}
    gated[0].gate.set()
    assert paho_client.result_for(first)[1].meta["status"] == "ok"
    assert paho_client.result_for(second)[1].meta["status"] == "ok"
    assert worker.metrics.value("fogline_cloud_results_total", {"status": "busy"}) == 1


def test_stopping_answers_every_queued_item_first(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    batching = BatchingConfig(max_batch_size=64, max_queue_delay_ms=5000)
    worker = started(cloud_config(batching=batching))
    envs = [make_features("site-a") for _ in range(5)]
    for env in envs:
        paho_client.publish("site-a", encode_envelope(env))
    while worker.queue_depth < 5:  # all queued, waiting for a batch that is not yet due
        threading.Event().wait(0.01)
    worker.stop()
    for env in envs:
        assert paho_client.result_for(env)[1].meta["status"] == "ok"
    assert not worker.ready


def test_two_workers_on_a_shared_subscription_split_the_load(
    broker, started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    if not broker.supports_shared_subscriptions:
        pytest.skip("the embedded broker has no shared subscriptions")
    a = started(cloud_config(worker_id="wa"))
    b = started(cloud_config(worker_id="wb"))
    envs = [make_features("site-a") for _ in range(40)]
    for env in envs:
        paho_client.publish("site-a", encode_envelope(env))
    workers = [paho_client.result_for(env)[1].meta["worker"] for env in envs]
    assert set(workers) == {"wa", "wb"}
    assert len(paho_client.wait_for(40)) == 40  # each item answered once
    assert (
        a.metrics.value("fogline_cloud_received_total")
        + b.metrics.value("fogline_cloud_received_total")
        == 40
    )


def test_a_bundle_directory_that_is_not_a_bundle_is_a_config_error(
    cloud_config, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    worker = CloudWorker(cloud_config(bundles=(tmp_path / "nothing",)))
    with pytest.raises(ConfigError, match=r"no manifest\.json"):
        worker.start()
    assert not worker.ready


def test_an_unreachable_broker_is_a_broker_error(cloud_config) -> None:  # type: ignore[no-untyped-def]
    from fogline._broker import free_port
    from fogline._mqtt import MqttSettings

    cfg = cloud_config(broker=MqttSettings(port=free_port(), connect_timeout_s=0.5))
    worker = CloudWorker(cfg)
    with pytest.raises(BrokerError, match="no connection"):
        worker.start()
    assert not worker.ready


def test_with_the_embedded_broker_a_plain_subscription_is_served(
    cloud_config, paho_factory, make_features, topic_prefix: str, started
) -> None:  # type: ignore[no-untyped-def]
    from fogline._broker import EmbeddedBroker
    from fogline._mqtt import MqttSettings

    with EmbeddedBroker() as embedded:
        settings = MqttSettings(host=embedded.host, port=embedded.port, topic_prefix=topic_prefix)
        worker = started(cloud_config(broker=settings, share_group=None))
        client = paho_factory(embedded.host, embedded.port)
        env = make_features("site-a")
        client.publish("site-a", encode_envelope(env))
        assert client.result_for(env)[1].meta["status"] == "ok"
        worker.stop()
        client.close()


class PoisonOutputBackend:
    """The real onnxruntime backend, except that a row whose first feature is a marker
    comes out as the marker says: NaN, or a logit beyond what float16 holds."""

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        self.outputs = {7.0: np.nan, 8.0: 1e6}

    @property
    def name(self) -> str:
        return "poison-output"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(inputs)
        marks = inputs["features"][:, 0]
        for name, computed in out.items():
            rows = computed.copy()
            for k, mark in enumerate(marks.tolist()):
                if mark in self.outputs:
                    rows[k, 0] = self.outputs[mark]
            out[name] = rows
        return out

    def warmup(self) -> None:
        self.inner.warmup()


def test_an_output_row_the_result_codec_refuses_fails_that_item_and_serving_goes_on(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    def load(bundle: Bundle) -> Backend:
        return PoisonOutputBackend(OnnxRuntimeBackend(bundle.cloud_model_path))

    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=50)
    worker = started(cloud_config(batching=batching), backend_loader=load)
    features = np.full((1, 16), 0.5, np.float32)
    nan_row, big_row = (features.copy() for _ in range(2))
    nan_row[0, 0], big_row[0, 0] = 7.0, 8.0
    envs = [  # fp32: the markers arrive exactly
        dataclasses.replace(make_features("site-a", tensors={"features": t}), codec=Codec.FP32)
        for t in (features, nan_row, big_row, features)
    ]
    # one message: the four items reach the same batch
    paho_client.publish("site-a", b"".join(encode_envelope(e) for e in envs))
    metas = [paho_client.result_for(e)[1].meta for e in envs]
    assert [m["status"] for m in metas] == ["ok", "error", "error", "ok"]
    assert "NaN or infinite" in metas[1]["error"]
    assert "fp16 cannot hold" in metas[2]["error"]
    assert worker.ready
    later = make_features("site-a")
    paho_client.publish("site-a", encode_envelope(later))
    assert paho_client.result_for(later)[1].meta["status"] == "ok"
    assert worker.metrics.value("fogline_cloud_results_total", {"status": "ok"}) == 3
    assert worker.metrics.value("fogline_cloud_results_total", {"status": "error"}) == 2
