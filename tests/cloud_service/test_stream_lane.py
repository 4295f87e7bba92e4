"""Edge features and inference API requests share each model's scheduler: the worker's
MQTT ingest runs bundle cloud parts through the repository's ``stream`` lane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fogline.cloud_service import CloudWorker, ModelRepository, select_backend
from fogline.cloud_service._stream_lane import LaneBackend
from fogline.compression import encode_envelope
from fogline.sync import Bundle

pytestmark = pytest.mark.integration


@pytest.fixture
def repository(tiny_bundle: Path) -> Iterator[ModelRepository]:
    repo = ModelRepository(bundles=(tiny_bundle,), backend=select_backend("onnxruntime"))
    repo.start()
    yield repo
    repo.stop()


def test_edge_features_are_answered_through_the_models_stream_lane(
    repository: ModelRepository, cloud_config, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    worker = CloudWorker(
        cloud_config(), backend_loader=lambda bundle: LaneBackend(repository, bundle)
    )
    worker.start()
    try:
        sent = [make_features("site-a", seed=i) for i in range(6)]
        for env in sent:
            paho_client.publish("site-a", encode_envelope(env))
        for env in sent:
            _topic, got = paho_client.result_for(env)
            assert got.meta["status"] == "ok"
        assert worker.status()["backends"] == {"tiny@1": "onnxruntime (stream lane)"}
    finally:
        worker.stop()
    requests = repository.metrics.value(
        "fogline_model_requests_total",
        {"model": "tiny", "version": "1", "lane": "stream", "outcome": "ok"},
    )
    assert 1 <= requests <= 6  # one request per batch the worker formed


def test_the_stream_lane_backend_gives_the_models_own_outputs(
    repository: ModelRepository, tiny_bundle: Path
) -> None:
    bundle = Bundle.load(tiny_bundle)
    backend = LaneBackend(repository, bundle)
    features = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    got = backend.run({backend.input_names[0]: features})
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.cloud_model_path), providers=["CPUExecutionProvider"])
    (expected,) = sess.run([bundle.cloud.output], {backend.input_names[0]: features})
    np.testing.assert_allclose(got[bundle.cloud.output], expected, atol=1e-5)
