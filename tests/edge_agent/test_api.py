"""The local HTTP API through a real uvicorn server."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from fogline._broker import free_port
from fogline._mqtt import MqttSettings
from fogline.edge_agent import (
    Agent,
    AgentConfig,
    BreakerConfig,
    ConfigError,
    HttpConfig,
    OutboxConfig,
    RuntimeConfig,
    create_app,
)
from tests.conftest import make_tiny_bundle
from tests.edge_agent.conftest import cloud_labels, fill, frames

pytestmark = pytest.mark.integration

Serve = Callable[[Agent], httpx.Client]


class _Server:
    """uvicorn serving an agent's API on a free loopback port, in a thread."""

    def __init__(self, agent: Agent) -> None:
        port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(agent), host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.01)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Serve an agent's API; an httpx client for it. Servers stop at teardown."""
    servers: list[_Server] = []

    def start(agent: Agent) -> httpx.Client:
        servers.append(_Server(agent))
        return servers[-1].client

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def dropping_api(module_broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One API over an agent that drops everything, shared by the bad-body cases."""
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"), relevance=1.0)
    config = AgentConfig(
        site="bodies",
        bundle_dir=bundle,
        broker=MqttSettings(host=module_broker.host, port=module_broker.port),
        runtime=RuntimeConfig(max_batch=4, warmup_runs=1),
    )
    with Agent(config) as agent:
        server = _Server(agent)
        try:
            yield server.client
        finally:
            server.close()


def test_infer_answers_nested_lists_and_raw_bytes_from_the_cloud(
    bundle_factory, agent_factory, responder_factory, serve
) -> None:
    bundle = bundle_factory(relevance=0.0, exit_confidence=1.0)
    responder_factory(bundle)
    http = serve(agent_factory(bundle, codec="fp32"))
    batch = frames(2, seed=4)
    want = cloud_labels(bundle, batch).tolist()

    r = http.post("/v1/infer", json={"data": batch[0].tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "cloud"
    assert body["decision"] == "forward"
    assert body["label"] == want[0]
    assert body["bundle"] == "tiny@1"
    assert body["thresholds"] == {"relevance": 0.0, "exit_confidence": 1.0}
    assert body["worker"] == "responder-1"
    assert body["latency_ms"] > 0
    assert isinstance(body["relevance"], float)
    assert isinstance(body["exit_confidence"], float)

    raw = base64.b64encode(batch[1].tobytes()).decode()
    r = http.post("/v1/infer", json={"b64": raw, "shape": [1, 8, 8], "dtype": "uint8"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == want[1]


def test_infer_answers_locally_without_the_cloud(bundle_factory, agent_factory, serve) -> None:
    http = serve(agent_factory(bundle_factory(relevance=1.0)))
    r = http.post("/v1/infer", json={"data": frames(1)[0, 0].tolist()})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "dropped"
    assert r.json()["label"] is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"data": [[1, 2], [3, 4]]}, "input shape [2, 2] does not match the model input [1, 8, 8]"),
        ({"data": [[1, 2], [3]]}, "not a rectangular array"),
        ({"data": [["a"] * 8] * 8}, "must hold only numbers"),
        ({"data": [[300] * 8] * 8}, "outside the range of uint8"),
        ({"data": [[0.5] * 8] * 8}, "dtype float64; the model takes uint8"),
        ({"data": [[1] * 8] * 8, "shape": [8, 9]}, "'shape' says [8, 9]"),
        ({"data": [[1] * 8] * 8, "b64": "AA=="}, "exactly one of 'data'"),
        ({}, "exactly one of 'data'"),
        ({"b64": "AAAA"}, "'shape' is required"),
        ({"b64": "***", "shape": [1, 8, 8]}, "not valid base64"),
        ({"b64": "AAAA", "shape": [1, 8, 8]}, "holds 3 bytes; shape [1, 8, 8] of uint8 needs 64"),
        ({"b64": "AAAA", "shape": [1, 8, 8], "dtype": "float32"}, "dtype float32 does not fit"),
        ({"b64": "AAAA", "shape": [3], "dtype": "complex"}, "dtype 'complex' is not one of"),
        ({"b64": "AAAA", "shape": [-3]}, "negative dimension"),
        ({"data": [1], "shape": "x"}, "shape: Input should be a valid list"),
        ({"data": [1], "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"data": [[True] * 8] * 8}, "not true/false"),
        ({"data": [[1] * 7 + [False]] * 8}, "not true/false"),
        ({"data": [[1] * 8] * 8, "priority": 2**63}, "priority: Input should be less than"),
        ({"data": [[1] * 8] * 8, "priority": -(2**63)}, "priority: Input should be greater"),
        ({"data": [[1] * 8] * 8, "priority": 1.5}, "priority: Input should be a valid integer"),
    ],
)
def test_a_bad_body_gets_a_4xx_that_names_the_problem(
    dropping_api: httpx.Client, body: dict[str, object], problem: str
) -> None:
    r = dropping_api.post("/v1/infer", json=body)
    assert r.status_code == 422, r.text
    assert problem in r.json()["error"]


def test_a_body_that_is_not_json_is_refused(dropping_api: httpx.Client) -> None:
    r = dropping_api.post(
        "/v1/infer", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert "not valid JSON" in r.json()["error"]


def test_attack_a_deeply_nested_body_is_refused_without_a_crash(dropping_api: httpx.Client) -> None:
    body = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = dropping_api.post("/v1/infer", content=body)
    assert r.status_code == 422
    assert "nested too deeply" in r.json()["error"]
    assert dropping_api.get("/healthz").status_code == 200


def test_attack_a_declared_huge_body_is_refused_before_it_is_read(
    dropping_api: httpx.Client,
) -> None:
    # A Content-Length of about a terabyte and no body: the answer must come at once, not
    # after waiting for bytes that never arrive.
    host, port = dropping_api.base_url.host, dropping_api.base_url.port
    assert port is not None
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999999\r\n\r\n"
        )
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert "over the 8388608-byte limit" in head


def test_attack_a_streamed_body_over_the_limit_is_cut_off_with_413(
    dropping_api: httpx.Client,
) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"data": "'
        for _ in range(200):  # 12.5 MiB in all, no Content-Length (chunked)
            sent += 65536
            yield b"x" * 65536
        yield b'"}'

    r = dropping_api.post("/v1/infer", content=chunks())
    assert r.status_code == 413
    assert r.json() == {
        "error": "the request body is over the 8388608-byte limit",
        "type": "RequestTooLarge",
    }


def test_a_refused_value_is_not_echoed_back_whole(dropping_api: httpx.Client) -> None:
    huge = "x" * 1_000_000
    r = dropping_api.post("/v1/infer", json={"data": [[1] * 8] * 8, "tag": huge})
    assert r.status_code == 422
    assert "tag: String should have at most 1024 characters" in r.json()["error"]
    assert len(r.content) < 4096


def test_a_json_body_is_read_whatever_its_content_type_says(dropping_api: httpx.Client) -> None:
    # As the cloud's inference API does: the body is JSON by contract, not by header.
    for content_type in (None, "text/plain", "application/octet-stream"):
        headers = {} if content_type is None else {"content-type": content_type}
        r = dropping_api.post(
            "/v1/infer",
            content=b'{"data": ' + str([[1] * 8] * 8).encode() + b"}",
            headers=headers,
        )
        assert r.status_code == 200, (content_type, r.text)


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/no/such/route", 404, "NotFound"),
        ("GET", "/v1/infer", 405, "MethodNotAllowed"),
        ("DELETE", "/readyz", 405, "MethodNotAllowed"),
    ],
)
def test_unknown_routes_and_methods_answer_in_the_documented_error_shape(
    dropping_api: httpx.Client, method: str, path: str, status: int, kind: str
) -> None:
    r = dropping_api.request(method, path)
    assert r.status_code == status
    body = r.json()
    assert set(body) == {"error", "type"}
    assert body["type"] == kind


def test_the_body_limit_is_configured_and_validated() -> None:
    with pytest.raises(ConfigError, match=r"http\.max_body_bytes"):
        HttpConfig(max_body_bytes=0)
    assert HttpConfig(max_body_bytes=1024).max_body_bytes == 1024


def test_a_cloud_timeout_is_a_504_when_the_agent_must_not_degrade(
    bundle_factory, agent_factory, serve
) -> None:
    agent = agent_factory(
        bundle_factory(relevance=0.0, exit_confidence=1.0),
        cloud_timeout_ms=150,
        breaker=BreakerConfig(offline="fail"),
    )
    http = serve(agent)
    r = http.post("/v1/infer", json={"data": frames(1)[0].tolist()})
    assert r.status_code == 504
    assert r.json()["type"] == "CloudTimeoutError"
    assert "within 150 ms" in r.json()["error"]


def test_a_cloud_timeout_gives_the_degraded_edge_answer_by_default(
    bundle_factory, agent_factory, serve
) -> None:
    agent = agent_factory(bundle_factory(relevance=0.0, exit_confidence=1.0), cloud_timeout_ms=150)
    http = serve(agent)
    r = http.post("/v1/infer", json={"data": frames(1)[0].tolist(), "tag": "cam-7"})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "degraded"
    assert body["decision"] == "forward"
    assert body["source"] == "edge"
    assert body["tag"] == "cam-7"


def test_a_full_outbox_disk_is_a_507_that_says_so_and_the_agent_recovers_when_space_returns(
    bundle_factory, agent_factory, responder_factory, serve, small_fs
) -> None:
    bundle = bundle_factory(relevance=0.0, exit_confidence=1.0)
    responder_factory(bundle)
    fs = small_fs("512k")
    agent = agent_factory(bundle, outbox=OutboxConfig(path=fs / "outbox.db"))
    http = serve(agent)
    body = {"data": frames(1)[0].tolist()}
    assert http.post("/v1/infer", json=body).status_code == 200
    deadline = time.monotonic() + 10
    while agent.stats()["outbox_items"] and time.monotonic() < deadline:
        time.sleep(0.02)  # the answered item's delete
    filler = fill(fs, leave=0)

    r = http.post("/v1/infer", json=body)
    assert r.status_code == 507, r.text
    assert r.json()["type"] == "OutboxStorageFullError"
    assert r.json()["error"].startswith("outbox storage full: the outbox refused 1 items")
    assert r.headers["Retry-After"] == "10"
    # The refused item is nowhere: not in the outbox, not in the gauges.
    assert agent.metrics.value("fogline_agent_outbox_items") == agent.stats()["outbox_items"] == 0
    assert http.get("/readyz").status_code == 200  # the agent still answers what it can

    filler.unlink()
    r = http.post("/v1/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "cloud"


def test_health_readiness_and_metrics(broker, bundle_factory, agent_factory, serve) -> None:
    agent = agent_factory(bundle_factory(relevance=1.0))
    http = serve(agent)
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "model": True, "mqtt": True, "failed": None}
    http.post("/v1/infer", json={"data": frames(1)[0].tolist()})
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "fogline_agent_inputs_total 1.0" in text
    assert 'fogline_agent_decisions_total{kind="drop"} 1.0' in text
    assert 'fogline_agent_latency_seconds_count{source="dropped"} 1.0' in text
    assert "fogline_agent_ready 1.0" in text
    assert 'site="site-a"' in text
    info = http.get("/v1/info").json()
    assert info["input"] == {
        "input": "frame",
        "shape": [1, 8, 8],
        "dtype": "uint8",
        "outputs": ["features", "relevance", "exit_probs"],
    }

    broker.kill()
    deadline = time.monotonic() + 10
    while http.get("/readyz").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = http.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "model": True, "mqtt": False, "failed": None}


def test_an_agent_that_is_not_started_is_not_ready_and_refuses_work(
    bundle_factory, agent_factory, serve
) -> None:
    http = serve(agent_factory(bundle_factory(), start=False))
    assert http.get("/healthz").status_code == 200
    r = http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["model"] is False
    r = http.post("/v1/infer", json={"data": frames(1)[0].tolist()})
    assert r.status_code == 503
    assert r.json()["type"] == "NotRunningError"
