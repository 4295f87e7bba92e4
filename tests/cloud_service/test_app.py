"""The HTTP API on a real uvicorn server, over a worker on a real Mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from fogline._broker import free_port
from fogline.cloud_service import CloudWorker, create_app
from fogline.compression import encode_envelope

pytestmark = pytest.mark.integration


class ServerThread:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")  # type: ignore[arg-type]
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def worker(cloud_config) -> Iterator[CloudWorker]:  # type: ignore[no-untyped-def]
    w = CloudWorker(cloud_config())
    try:
        yield w
    finally:
        w.stop()


def test_readiness_turns_from_503_to_200_once_the_worker_is_up(worker: CloudWorker) -> None:
    with ServerThread(create_app(worker)) as srv, httpx.Client(base_url=srv.url) as http:
        assert http.get("/healthz").status_code == 200
        before = http.get("/readyz")
        assert before.status_code == 503
        assert before.json()["ready"] is False
        worker.start()
        after = http.get("/readyz")
        assert after.status_code == 200
        assert after.json()["ready"] is True
        assert after.json()["bundles"] == ["tiny@1"]
        worker.stop()
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200


def test_a_result_is_retrievable_over_http_once_answered(
    worker: CloudWorker, paho_client, make_features
) -> None:  # type: ignore[no-untyped-def]
    worker.start()
    env = make_features("site-a")
    paho_client.publish("site-a", encode_envelope(env))
    _, answer = paho_client.result_for(env)
    assert worker.flush(10)
    with ServerThread(create_app(worker)) as srv, httpx.Client(base_url=srv.url) as http:
        got = http.get(f"/v1/results/site-a/{env.message_id.hex()}")
        assert got.status_code == 200
        body = got.json()
        assert body["site"] == "site-a"
        assert body["message_id"] == env.message_id.hex()
        assert body["bundle"] == "tiny@1"
        assert body["label"] == answer.meta["label"]
        assert body["confidence"] == pytest.approx(answer.meta["confidence"], abs=1e-6)
        assert len(body["output"]) == 4
        assert body["worker"] == worker.worker_id
        # the canonical UUID form names the same result
        assert http.get(f"/v1/results/site-a/{env.message_uuid}").json() == body

        absent = http.get(f"/v1/results/site-a/{uuid.uuid4().hex}")
        assert absent.status_code == 404
        assert "error" in absent.json()
        other_site = http.get(f"/v1/results/site-b/{env.message_id.hex()}")
        assert other_site.status_code == 404
        malformed = http.get("/v1/results/site-a/xyz")
        assert malformed.status_code == 400
        assert "not a UUID" in malformed.json()["error"]

        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "fogline_cloud_received_total 1.0" in metrics.text
        assert 'fogline_cloud_results_total{status="ok"} 1.0' in metrics.text


def test_results_are_unavailable_not_missing_before_the_store_opens(worker: CloudWorker) -> None:
    with ServerThread(create_app(worker)) as srv, httpx.Client(base_url=srv.url) as http:
        got = http.get(f"/v1/results/site-a/{uuid.uuid4().hex}")
        assert got.status_code == 503
        assert "error" in got.json()
