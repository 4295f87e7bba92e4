"""Every long-lived thread of the cloud worker is supervised: a fault injected into each
kind is logged with what it was working on, counted in
``fogline_cloud_thread_failures_total``, and either carried on from (readiness stays true,
work goes on) or ends the worker's serving for good (``/readyz`` 503 naming it; ``fogline
cloud serve``, a real process, exits 70).

Real Mosquitto, real SQLite, real uvicorn, real subprocesses; the faults are methods the
loops call, replaced to raise.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from fogline._broker import free_port
from fogline.cloud_service import Backend, CloudWorker, OnnxRuntimeBackend, create_app
from fogline.cloud_service._scheduler import LaneScheduler
from fogline.compression import encode_envelope, mark_resent
from fogline.messaging import ThreadFailure
from fogline.sync import Bundle
from tests.cloud_service.conftest import PahoClient

pytestmark = pytest.mark.integration

LOGGER = "fogline.cloud"


def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def failures(worker: CloudWorker, thread: str) -> float:
    return worker.metrics.value("fogline_cloud_thread_failures_total", {"thread": thread})


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def fail_first(
    n: int, original: Callable[..., Any], error: Callable[[], BaseException]
) -> Callable[..., Any]:
    """``original``, except that its first ``n`` calls raise ``error()``."""
    left = [n]

    def call(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise error()
        return original(*args, **kwargs)

    return call


@pytest.fixture
def started() -> Iterator[Callable[..., CloudWorker]]:
    workers: list[CloudWorker] = []

    def start(config: object, **kw: object) -> CloudWorker:
        worker = CloudWorker(config, **kw)  # type: ignore[arg-type]
        workers.append(worker)
        return worker.start()

    yield start
    for w in workers:
        w.stop(timeout_s=2.0)  # a worker whose thread died has work that never drains


class ServerThread:
    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")  # type: ignore[arg-type]
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert until(lambda: self.server.started)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[CloudWorker], httpx.Client]]:
    servers: list[ServerThread] = []

    def start(worker: CloudWorker) -> httpx.Client:
        servers.append(ServerThread(create_app(worker)))
        return servers[-1].client

    yield start
    for s in servers:
        s.close()


# carry-on kinds


class FailingOnce:
    """The real onnxruntime backend, whose first run after warm-up raises what no backend
    maps: the batch thread's own supervisor is what catches it."""

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        self.warm = False
        self.failed = False

    @property
    def name(self) -> str:
        return "failing-once"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.warm and not self.failed:
            self.failed = True
            raise RuntimeError("injected fault in a batch")
        return self.inner.run(inputs)

    def warmup(self) -> None:
        self.inner.warmup()
        self.warm = True


def test_a_batch_that_fails_in_the_scheduler_thread_is_answered_and_the_thread_goes_on(
    started, cloud_config, paho_client, make_features, caplog
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR)

    def load(bundle: Bundle) -> Backend:
        return FailingOnce(OnnxRuntimeBackend(bundle.cloud_model_path))

    worker = started(cloud_config(), backend_loader=load)
    first, second = make_features("site-a"), make_features("site-a")
    paho_client.publish("site-a", encode_envelope(first))
    _topic, failed = paho_client.result_for(first)
    assert failed.meta["status"] == "error"
    assert "injected fault in a batch" in failed.meta["error"]
    paho_client.publish("site-a", encode_envelope(second))
    assert paho_client.result_for(second)[1].meta["status"] == "ok"
    assert failures(worker, "scheduler") == 1
    assert worker.ready
    (line,) = logged(caplog, "the scheduler thread failed on a batch of 1 requests")
    assert "in the stream lane of fogline-model-tiny-1" in line


def test_attack_an_item_whose_submission_raises_is_answered_and_not_left_in_flight(
    started, cloud_config, paho_client, make_features, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    worker = started(cloud_config())
    repository = worker.repository
    assert repository is not None
    monkeypatch.setattr(
        repository,
        "submit_many_async",
        fail_first(1, repository.submit_many_async, lambda: ZeroDivisionError("injected")),
    )
    poison, after = make_features("site-a"), make_features("site-a")
    paho_client.publish("site-a", encode_envelope(poison))
    _topic, answer = paho_client.result_for(poison)
    assert answer.meta["status"] == "error"
    assert answer.meta["error"] == "inference failed: internal error (ZeroDivisionError)"
    paho_client.publish("site-a", encode_envelope(after))
    assert paho_client.result_for(after)[1].meta["status"] == "ok"
    # The poison item was retired: its re-send is run, not left waiting for a lost copy.
    paho_client.received.clear()
    paho_client.publish("site-a", mark_resent(encode_envelope(poison)))
    assert paho_client.result_for(poison)[1].meta["status"] == "ok"
    assert failures(worker, "mqtt_handler") == 1
    assert worker.ready
    assert worker.flush(10)
    assert worker.metrics.value("fogline_cloud_acks_pending") == 0
    (line,) = logged(caplog, "the mqtt_handler thread failed")
    assert f"site-a/{poison.message_id.hex()} for bundle tiny@1" in line


def test_a_callback_that_escapes_the_mqtt_loop_is_counted_and_messages_keep_coming(
    started, cloud_config, paho_client, make_features, topic_prefix
) -> None:  # type: ignore[no-untyped-def]
    worker = started(cloud_config())
    connection = worker._mqtt
    assert connection is not None
    original = connection.client.on_subscribe

    def boom(*args: object) -> None:
        connection.client.on_subscribe = original
        raise RuntimeError("a bug in a callback")

    connection.client.on_subscribe = boom
    connection.subscribe(f"{topic_prefix}/elsewhere")
    assert until(lambda: failures(worker, "mqtt") == 1)
    env = make_features("site-a")
    paho_client.publish("site-a", encode_envelope(env))
    assert paho_client.result_for(env)[1].meta["status"] == "ok"
    assert until(lambda: worker.ready)


def test_a_handler_that_raises_in_the_http_api_is_a_500_and_the_server_goes_on(
    started, cloud_config, serve, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    worker = started(cloud_config())
    http = serve(worker)
    store = worker.store
    assert store is not None
    monkeypatch.setattr(store, "get", fail_first(1, store.get, lambda: RuntimeError("injected")))
    path = "/v1/results/site-a/" + "ab" * 16
    r = http.get(path)
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (RuntimeError), logged"}
    assert http.get(path).status_code == 404
    assert http.get("/readyz").status_code == 200
    assert 'fogline_cloud_thread_failures_total{thread="http"} 1.0' in http.get("/metrics").text
    (line,) = logged(caplog, "the http thread failed")
    assert f"request GET {path}" in line


# fatal kinds


def test_attack_a_fault_that_escapes_the_store_writer_ends_the_workers_serving_for_good(
    started, cloud_config, paho_client, make_features, serve, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    heard: list[ThreadFailure] = []
    worker = started(cloud_config(), on_failure=heard.append)
    http = serve(worker)
    store = worker.store
    assert store is not None

    def boom(results: object) -> None:
        raise RuntimeError("injected fault in the store writer")

    monkeypatch.setattr(store, "put_many", boom)
    env = make_features("site-a")
    paho_client.publish("site-a", encode_envelope(env))
    assert paho_client.result_for(env)[1].meta["status"] == "ok"  # answered before stored
    assert until(lambda: worker.failed is not None)
    failure = worker.failed
    assert failure is not None
    assert failure.kind == "store"
    assert heard == [failure]
    assert not worker.ready
    assert failures(worker, "store") == 1
    ready = http.get("/readyz")
    assert ready.status_code == 503
    message = (
        f"the store thread of cloud worker {worker.worker_id} failed: RuntimeError: injected "
        "fault in the store writer"
    )
    assert ready.json()["reason"] == message
    assert ready.json()["failed"] == message
    assert worker.metrics.value("fogline_cloud_ready") == 0
    (line,) = logged(caplog, "the store thread failed")
    assert f"while writing 1 results (site-a/{env.message_id.hex()})" in line


def test_attack_a_fault_that_escapes_a_scheduler_loop_ends_the_workers_serving_for_good(
    started, cloud_config, paho_client, make_features, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    heard: list[ThreadFailure] = []
    worker = started(cloud_config(), on_failure=heard.append)

    def boom(self: object, now: float, *, force: bool = False) -> object:
        raise RuntimeError("injected fault in the scheduler")

    monkeypatch.setattr(LaneScheduler, "poll", boom)
    paho_client.publish("site-a", encode_envelope(make_features("site-a")))
    assert until(lambda: worker.failed is not None)
    failure = worker.failed
    assert failure is not None
    assert (failure.kind, failure.owner) == ("scheduler", "the model repository")
    assert heard == [failure]
    assert not worker.ready
    assert worker.status()["reason"] == (
        "the scheduler thread of the model repository failed: RuntimeError: injected fault "
        "in the scheduler"
    )
    assert failures(worker, "scheduler") == 1


# the command: a real process exits 70 with one error line

_BOOT = """
import sys
{patch}
from fogline.cli import main
sys.argv = ["fogline", *sys.argv[1:]]
main()
"""

_PATCHES = {
    "store": (
        "from fogline.cloud_service._store import ResultStore\n"
        "def boom(self, results):\n"
        "    raise RuntimeError('injected fault in the store writer')\n"
        "ResultStore.put_many = boom\n",
        "error: the store thread of cloud worker cli-test failed: RuntimeError: injected fault "
        "in the store writer",
    ),
    "scheduler": (
        "from fogline.cloud_service._scheduler import LaneScheduler\n"
        "def boom(self, now, *, force=False):\n"
        "    raise RuntimeError('injected fault in the scheduler')\n"
        "LaneScheduler.poll = boom\n",
        "error: the scheduler thread of the model repository failed: RuntimeError: injected "
        "fault in the scheduler",
    ),
}


@pytest.mark.parametrize("kind", list(_PATCHES))
def test_attack_cloud_serve_exits_70_with_an_error_line_when_a_thread_fails_for_good(
    broker, tiny_bundle: Path, topic_prefix: str, tmp_path: Path, make_features, kind: str
) -> None:  # type: ignore[no-untyped-def]
    patch, expected = _PATCHES[kind]
    port = free_port()
    config = tmp_path / "cloud.toml"
    config.write_text(
        f"""
share_group = "{"fogline-cloud" if broker.supports_shared_subscriptions else ""}"
bundles = ["{tiny_bundle}"]
worker_id = "cli-test"

[broker]
url = "{broker.url}"
topic_prefix = "{topic_prefix}"

[store]
url = "sqlite:///{tmp_path / "results.db"}"

[http]
port = {port}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT.format(patch=patch), "cloud", "serve", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = None
    try:
        if kind == "store":  # one result reaches the store writer
            assert until(lambda: _ready(port) or proc.poll() is not None, 60)
            client = PahoClient(broker.host, broker.port, topic_prefix)
            client.publish("site-a", encode_envelope(make_features("site-a")))
        _out, err = proc.communicate(timeout=60)
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 70, err
    assert err.strip().splitlines()[-1] == expected


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
