"""One data plane: MQTT features and inference API requests run through the same model
repository, one batcher per model version, several versions of a bundle side by side, and
versions loaded and unloaded at run time without disturbing the others. Real Mosquitto,
real onnxruntime, real SQLite."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fogline.cloud_service import (
    BackendChoice,
    CloudWorker,
    Lane,
    ModelRepository,
)
from fogline.cloud_service._repository import bundle_model_config
from fogline.compression import Envelope, decode_envelope, encode_envelope
from tests.conftest import make_tiny_bundle

pytestmark = pytest.mark.integration

CPU = BackendChoice("onnxruntime", "tests run on the CPU")


def _tail(bundle_dir: Path) -> Callable[[Envelope], np.ndarray]:
    """The expected answer of a bundle's own cloud part for an envelope, as it arrives."""
    session = ort.InferenceSession(
        str(bundle_dir / "cloud.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(env: Envelope) -> np.ndarray:
        wire = decode_envelope(encode_envelope(env)).tensors["features"]
        (probs,) = session.run(["probs"], {"features": wire})
        return np.asarray(probs[0])

    return run


def test_features_and_api_requests_share_one_batcher_per_model_version(
    tiny_bundle: Path, cloud_config: Any, paho_client: Any, make_features: Any
) -> None:
    config = cloud_config()
    repo = ModelRepository(
        bundles=(tiny_bundle,), backend=CPU, bundle_config=bundle_model_config(config.batching)
    )
    repo.start()
    worker = CloudWorker(config, repository=repo)
    worker.start()
    try:
        sent = [make_features("site-a", seed=i) for i in range(20)]
        for env in sent:
            paho_client.publish("site-a", encode_envelope(env))
        api = repo.submit(
            "tiny", "1", {"features": np.zeros((2, 16), np.float32)}, lane=Lane.INTERACTIVE
        )
        for env in sent:
            assert paho_client.result_for(env)[1].meta["status"] == "ok"
        assert api.result(10)["probs"].shape == (2, 4)
        assert worker.flush(10)
    finally:
        worker.stop()
    # Each item is one request of the model's stream lane: no batch of batches.
    stream_ok = repo.metrics.value(
        "fogline_model_requests_total",
        {"model": "tiny", "version": "1", "lane": "stream", "outcome": "ok"},
    )
    assert stream_ok == len(sent)
    assert repo.ready  # the worker's stop leaves a repository it was given serving
    repo.stop()


def test_bundle_versions_are_served_side_by_side_while_one_loads_and_another_unloads(
    tmp_path: Path, cloud_config: Any, paho_client: Any, make_features: Any
) -> None:
    dirs = {v: make_tiny_bundle(tmp_path / f"tiny-{v}", version=v, seed=int(v)) for v in "123"}
    tails = {f"tiny@{v}": _tail(d) for v, d in dirs.items()}
    worker = CloudWorker(cloud_config(bundles=(dirs["1"], dirs["2"])))
    worker.start()
    repo = worker.repository
    assert repo is not None
    sent: list[tuple[Envelope, str]] = []  # (envelope, phase it was published in)
    phase = "two"
    lock = threading.Lock()
    published = threading.Semaphore(0)
    done = threading.Event()

    def stream() -> None:
        i = 0
        while not done.is_set():
            with lock:
                current = phase
            versions = {"two": "12", "three": "123", "after_unload": "123"}[current]
            for v in versions:
                env = make_features("site-a", bundle=f"tiny@{v}", seed=i)
                i += 1
                paho_client.publish("site-a", encode_envelope(env))
                with lock:
                    sent.append((env, current))
                published.release()

    publisher = threading.Thread(target=stream, daemon=True)
    publisher.start()
    try:
        for _ in range(60):
            assert published.acquire(timeout=10)
        assert repo.load_bundle(dirs["3"]).id == "tiny@3"
        with lock:
            phase = "three"
        for _ in range(90):
            assert published.acquire(timeout=10)
        repo.unload("tiny", "1")
        with lock:
            phase = "after_unload"
        for _ in range(60):
            assert published.acquire(timeout=10)
    finally:
        done.set()
        publisher.join(10)
    try:
        with lock:
            everything = list(sent)
        answers = {env.message_id: paho_client.result_for(env, 20)[1] for env, _ in everything}
        assert worker.flush(10)
        got = paho_client.wait_for(len(everything), 1)
        assert len(got) == len(everything)  # one answer each: nothing lost, nothing twice
        counts = {"ok": 0, "gone": 0}
        for env, when in everything:
            answer = answers[env.message_id]
            assert answer.bundle == env.bundle
            if env.bundle == "tiny@1" and answer.meta["status"] == "error":
                # Unloaded: refused as unknown, never answered by another version's tail.
                assert answer.meta["error"] == "unknown bundle 'tiny@1'"
                assert when != "two"
                counts["gone"] += 1
                continue
            assert answer.meta["status"] == "ok", (env.bundle, when, answer.meta)
            assert not (env.bundle == "tiny@1" and when == "after_unload"), "served when gone"
            np.testing.assert_allclose(answer.tensors["probs"], tails[env.bundle](env), atol=2e-3)
            counts["ok"] += 1
        assert counts["gone"] >= 1
        assert {b.id for b in repo.bundles()} == {"tiny@2", "tiny@3"}
        assert worker.store is not None
        assert worker.store.count() == counts["ok"]
    finally:
        worker.stop()


class PoisonedBackend:
    """The real onnxruntime backend, failing any batch that holds a row starting 999."""

    def __init__(self, path: Path, max_batch_size: int) -> None:
        from fogline.cloud_service import BackendError, OnnxRuntimeBackend

        self._inner = OnnxRuntimeBackend(path, max_batch_size=max_batch_size)
        self._error = BackendError
        self.batches: list[int] = []

    @property
    def name(self) -> str:
        return "poisoned"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inner.input_names

    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        features = inputs["features"]
        self.batches.append(len(features))
        if (features[:, 0] == 999).any():
            raise self._error("a poisoned row")
        return self._inner.run(inputs)

    def warmup(self) -> None:
        self._inner.warmup()


def test_one_bad_request_in_a_batch_fails_alone_and_the_others_are_answered(
    tiny_bundle: Path,
) -> None:
    from fogline.cloud_service import BackendError, BatchingConfig

    backends: list[PoisonedBackend] = []

    def load(path: Path, max_batch_size: int) -> PoisonedBackend:
        backends.append(PoisonedBackend(path, max_batch_size))
        return backends[-1]

    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=300)
    repo = ModelRepository(
        bundles=(tiny_bundle,), bundle_config=bundle_model_config(batching), backend_loader=load
    )
    repo.start()
    try:
        rows = [np.full((1, 16), 0.1 * i, np.float32) for i in range(4)]
        rows[2][0, 0] = 999
        futures = [repo.submit("tiny", "1", {"features": r}, lane=Lane.STREAM) for r in rows]
        for i, future in enumerate(futures):
            if i == 2:
                with pytest.raises(BackendError, match="poisoned"):
                    future.result(10)
            else:
                assert future.result(10)["probs"].shape == (1, 4)
        assert backends[0].batches[-5:] == [4, 1, 1, 1, 1]  # the batch, then one by one
    finally:
        repo.stop()


def test_the_repository_stays_ready_while_a_bundle_added_at_run_time_loads(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """A version loaded while serving (on demand, for a rollout) may take long (a TensorRT
    engine build): the versions already served keep the repository ready meanwhile."""
    from fogline.cloud_service._backends import BackendSettings, load_backend, select_backend

    gate = threading.Event()
    loading = threading.Event()
    choice = select_backend("onnxruntime")

    def load(path: Path, max_batch_size: int) -> Any:
        if "src-3" in str(path):
            loading.set()
            gate.wait(30)
        return load_backend(choice, path, max_batch_size=max_batch_size, settings=BackendSettings())

    third = make_tiny_bundle(tmp_path / "src-3", version="3", seed=3)
    repo = ModelRepository(bundles=(tiny_bundle,), backend_loader=load)
    repo.start()
    try:
        assert repo.ready
        loader = threading.Thread(target=repo.load_bundle, args=(third,))
        loader.start()
        assert loading.wait(30)
        assert repo.ready  # tiny@1 serves on while tiny@3 loads
        assert repo.bundle("tiny@3") is None
        gate.set()
        loader.join(30)
        assert repo.bundle("tiny@3") is not None
        assert repo.ready
    finally:
        gate.set()
        repo.stop()
