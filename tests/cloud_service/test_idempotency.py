"""Re-sent items are answered, not run or stored again; messages are acknowledged only
after their results are stored. Real Mosquitto, real SQLite."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fogline.cloud_service import (
    Backend,
    CloudWorker,
    OnnxRuntimeBackend,
    ResultStore,
    StoredResult,
)
from fogline.compression import encode_envelope, mark_resent
from fogline.sync import Bundle

pytestmark = pytest.mark.integration


class CountingBackend:
    """The real onnxruntime backend, counting the rows it runs after warm-up."""

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        self.rows = 0
        self.warm = False

    @property
    def name(self) -> str:
        return "counting"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.warm:
            self.rows += len(next(iter(inputs.values())))
        return self.inner.run(inputs)

    def warmup(self) -> None:
        self.inner.warmup()
        self.warm = True


class GatedStore(ResultStore):
    """A real SQLite store whose writes wait for the test to open the gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()

    def put_many(self, results: Sequence[StoredResult]) -> None:
        self.gate.wait(20)
        super().put_many(results)


@pytest.fixture
def started() -> Iterator[Callable[..., CloudWorker]]:
    workers: list[CloudWorker] = []

    def start(config: object, **kw: object) -> CloudWorker:
        worker = CloudWorker(config, **kw)  # type: ignore[arg-type]
        workers.append(worker)
        return worker.start()

    yield start
    for w in workers:
        w.stop()


def _counting(holder: list[CountingBackend]) -> Callable[[Bundle], Backend]:
    def load(bundle: Bundle) -> Backend:
        backend = CountingBackend(OnnxRuntimeBackend(bundle.cloud_model_path))
        holder.append(backend)
        return backend

    return load


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_resent_item_gets_the_same_answer_without_running_or_storing_again(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    backends: list[CountingBackend] = []
    worker = started(cloud_config(), backend_loader=_counting(backends))
    env = make_features("site-a", seed=4)
    payload = encode_envelope(env)
    paho_client.publish("site-a", payload)
    first = paho_client.wait_for(1)[0][1]
    paho_client.publish("site-a", payload)
    paho_client.publish("site-a", payload)
    answers = [got for _t, got in paho_client.wait_for(3)]
    assert len(answers) == 3
    assert {a.message_id for a in answers} == {env.message_id}
    assert {a.meta["label"] for a in answers} == {first.meta["label"]}
    assert all(a.meta.get("duplicate") for a in answers[1:])
    np.testing.assert_allclose(answers[2].tensors["probs"], first.tensors["probs"], atol=2e-3)
    assert backends[0].rows == 1
    assert worker.flush(10)
    assert worker.store is not None
    assert worker.store.count() == 1
    assert (
        worker.metrics.value("fogline_cloud_duplicates_suppressed_total", {"source": "memory"}) == 2
    )


def test_one_message_id_from_two_sites_is_two_items_run_and_stored_apart(
    started, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    # Message ids are the sites' own: two sites may pick the same one (by accident or on
    # purpose), and neither may be answered with the other's result.
    backends: list[CountingBackend] = []
    worker = started(cloud_config(), backend_loader=_counting(backends))
    a = make_features("site-a", seed=1)
    b = dataclasses.replace(make_features("site-b", seed=2), message_id=a.message_id)
    paho_client.publish("site-a", encode_envelope(a))
    topic_a, _ = paho_client.result_for(a)
    paho_client.publish("site-b", encode_envelope(b))
    answers = paho_client.wait_for(2)
    assert len(answers) == 2
    got_b = next(env for t, env in answers if t.endswith("/site-b/results"))
    assert topic_a.endswith("/site-a/results")
    assert not got_b.meta.get("duplicate")
    assert backends[0].rows == 2  # each one ran
    # site-b's answer is its own features' (int8 on the wire, so within the codec's error).
    expected = backends[0].inner.run({"features": b.tensors["features"]})["probs"][0]
    np.testing.assert_allclose(got_b.tensors["probs"], expected, atol=1e-2)
    assert worker.flush(10)
    assert worker.store is not None
    assert worker.store.count() == 2
    assert worker.store.get("site-a", a.message_id) is not None
    assert worker.store.get("site-b", a.message_id) is not None


def test_an_item_another_worker_stored_is_answered_from_the_store(
    started, cloud_config, paho_client, make_features, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = make_features("site-b", seed=8)
    first = started(cloud_config(store=_store_config(url), worker_id="w-first"))
    paho_client.publish("site-b", encode_envelope(env))
    original = paho_client.wait_for(1)[0][1]
    assert first.flush(10)
    first.stop()

    backends: list[CountingBackend] = []
    second = started(
        cloud_config(store=_store_config(url), worker_id="w-second"),
        backend_loader=_counting(backends),
    )
    # The agent's outbox re-sends with the resent flag set, which sends the worker to the
    # store.
    paho_client.publish("site-b", mark_resent(encode_envelope(env)))
    answers = paho_client.wait_for(2)
    again = answers[1][1]
    assert again.meta["status"] == "ok"
    assert again.meta["duplicate"] is True
    assert again.meta["worker"] == "w-second"
    assert again.meta["label"] == original.meta["label"]
    assert backends[0].rows == 0
    assert second.flush(10)
    assert second.store is not None
    assert second.store.count() == 1
    stored = second.store.get("site-b", env.message_id)
    assert stored is not None
    assert stored.worker == "w-first"


def test_messages_are_acknowledged_only_after_their_results_are_stored(
    started, cloud_config, paho_client, make_features, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    store = GatedStore(f"sqlite:///{tmp_path / 'gated.db'}")
    worker = started(cloud_config(), store=store)
    for i in range(5):
        paho_client.publish("site-a", encode_envelope(make_features("site-a", seed=i)))
    paho_client.wait_for(5)  # answered at once, before the store has them
    assert worker.status()["unacknowledged"] == 5
    assert worker.metrics.value("fogline_cloud_acks_pending") == 5
    store.gate.set()
    assert _wait(lambda: worker.status()["unacknowledged"] == 0)
    assert store.count() == 5
    store.close()


def test_a_malformed_message_is_acknowledged_at_once_and_never_redelivered(
    started, cloud_config, paho_client
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    paho_client.publish("site-a", b"garbage" * 10)
    assert _wait(lambda: worker.metrics.value("fogline_cloud_received_total") == 1)
    assert _wait(lambda: worker.status()["unacknowledged"] == 0)
    assert worker.metrics.value("fogline_cloud_redeliveries_total") == 0


def _store_config(url: str) -> object:
    from fogline.cloud_service import StoreConfig

    return StoreConfig(url)
