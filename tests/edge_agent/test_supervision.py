"""Every long-lived thread of the agent is supervised: a fault injected into each kind is
logged with what it was working on, counted in ``fogline_agent_thread_failures_total``,
and either carried on from (readiness stays true, work goes on) or ends the agent's
serving for good (readiness false; ``fogline agent run``, a real process, exits 70).

Real Mosquitto, a real stand-in cloud, real uvicorn, real subprocesses; the faults are
methods the loops call, replaced to raise.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
import uvicorn

from fogline._broker import free_port
from fogline.edge_agent import (
    Agent,
    AgentError,
    Answer,
    NotRunningError,
    OutboxConfig,
    create_app,
)
from fogline.messaging import ThreadFailure
from tests.edge_agent.conftest import frames

pytestmark = pytest.mark.integration

FORWARD_ALL = {"relevance": 0.0, "exit_confidence": 1.0}
EDGE_ALL = {"relevance": 0.0, "exit_confidence": 0.0}
LOGGER = "fogline.edge_agent"


def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def failures(agent: Agent, thread: str) -> float:
    return agent.metrics.value("fogline_agent_thread_failures_total", {"thread": thread})


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def fail_first(n: int, original: Callable[..., Any], message: str) -> Callable[..., Any]:
    """``original``, except that its first ``n`` calls raise ``RuntimeError(message)``."""
    left = [n]

    def call(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError(message)
        return original(*args, **kwargs)

    return call


# carry-on kinds: logged, counted, readiness stays true, work goes on


def test_a_batch_that_fails_in_the_model_thread_fails_its_callers_and_the_thread_goes_on(
    bundle_factory, agent_factory, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    agent = agent_factory(bundle_factory(**EDGE_ALL))
    monkeypatch.setattr(
        agent, "_process", fail_first(1, agent._process, "injected fault in the model thread")
    )
    with pytest.raises(AgentError, match=r"the agent failed on a batch of 1 inputs \(tags 'cam"):
        agent.submit(frames(1)[0], tag="cam-1/17").result(10)
    assert agent.submit(frames(1)[0]).result(10).source == "edge"
    assert failures(agent, "model") == 1
    assert agent.ready
    assert agent.failed is None
    (line,) = logged(caplog, "the model thread failed")
    assert "a batch of 1 inputs (tags 'cam-1/17')" in line
    assert "RuntimeError: injected fault in the model thread" in line


def test_a_resend_loop_that_fails_is_entered_again_and_re_sends_go_on(
    bundle_factory, agent_factory, responder_factory, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    bundle = bundle_factory(**FORWARD_ALL)
    agent = agent_factory(
        bundle,
        outbox=OutboxConfig(retry_initial_ms=50, retry_max_ms=100),
        cloud_timeout_ms=60_000,
    )
    delivery = agent._delivery
    monkeypatch.setattr(
        delivery, "due", fail_first(2, delivery.due, "injected fault in the resend loop")
    )
    future = agent.submit_batch(frames(1))[0]  # no cloud yet: it waits, and is re-sent
    assert until(lambda: agent.stats()["resends"] >= 1)
    assert failures(agent, "resend") == 2
    assert agent.ready
    responder_factory(bundle)
    assert future.result(10).source == "cloud"
    assert len(logged(caplog, "the resend thread failed")) == 2
    assert "carrying on" in logged(caplog, "the resend thread failed")[0]


def test_attack_a_result_whose_handling_raises_is_counted_and_the_item_is_answered_again(
    bundle_factory, agent_factory, responder_factory, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    agent = agent_factory(bundle, outbox=OutboxConfig(retry_initial_ms=100, retry_max_ms=200))
    delivery = agent._delivery
    monkeypatch.setattr(
        delivery, "on_result", fail_first(1, delivery.on_result, "injected poison result")
    )
    answer = agent.submit_batch(frames(1))[0].result(10)  # answered by the re-send
    assert answer.source == "cloud"
    assert failures(agent, "mqtt_handler") == 1
    assert agent.ready
    (line,) = logged(caplog, "the mqtt_handler thread failed")
    assert f"the result for {answer.message_id} on " in line
    assert "RuntimeError: injected poison result" in line


def test_a_callback_that_escapes_the_mqtt_loop_is_counted_and_results_keep_coming(
    bundle_factory, agent_factory, responder_factory, topic_prefix
) -> None:  # type: ignore[no-untyped-def]
    bundle = bundle_factory(**FORWARD_ALL)
    responder_factory(bundle)
    agent = agent_factory(bundle)
    connection = agent._transport.connection
    original = connection.client.on_subscribe

    def boom(*args: object) -> None:
        connection.client.on_subscribe = original
        raise RuntimeError("a bug in a callback")

    connection.client.on_subscribe = boom
    connection.subscribe(f"{topic_prefix}/elsewhere")
    assert until(lambda: failures(agent, "mqtt") == 1)
    assert agent.submit_batch(frames(2))[0].result(10).source == "cloud"
    assert until(lambda: agent.ready)


class _Server:
    def __init__(self, agent: Agent) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(agent), host="127.0.0.1", port=self.port, log_level="error")
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
def serve() -> Iterator[Callable[[Agent], httpx.Client]]:
    servers: list[_Server] = []

    def start(agent: Agent) -> httpx.Client:
        servers.append(_Server(agent))
        return servers[-1].client

    yield start
    for server in servers:
        server.close()


def test_a_handler_that_raises_in_the_http_api_is_a_500_and_the_server_goes_on(
    bundle_factory, agent_factory, serve, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    agent = agent_factory(bundle_factory(**EDGE_ALL))
    http = serve(agent)
    monkeypatch.setattr(agent, "info", fail_first(1, agent.info, "injected fault in a handler"))
    r = http.get("/v1/info")
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (RuntimeError), logged", "type": "InternalError"}
    assert http.get("/v1/info").json()["site"] == agent.site
    assert http.post("/v1/infer", json={"data": frames(1)[0].tolist()}).status_code == 200
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["failed"] is None
    assert 'fogline_agent_thread_failures_total{thread="http"} 1.0' in http.get("/metrics").text
    (line,) = logged(caplog, "the http thread failed")
    assert "request GET /v1/info" in line


# fatal kinds: the agent stops serving for good, and says why


def test_attack_a_fault_that_escapes_the_journal_ends_the_agents_serving_for_good(
    bundle_factory, agent_factory, serve, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR, logger=LOGGER)
    agent = agent_factory(bundle_factory(**FORWARD_ALL), start=False)
    heard: list[ThreadFailure] = []
    agent.on_failure = heard.append

    def finished(n: int) -> None:
        raise RuntimeError("injected fault in the journal thread")

    # The journal calls this after every commit, outside its own error handling.
    monkeypatch.setattr(agent._delivery, "journal_done", finished)
    agent.start()
    http = serve(agent)
    returned: list[list[Future[Answer]]] = []
    caller = threading.Thread(target=lambda: returned.append(agent.submit_batch(frames(2))))
    caller.start()
    caller.join(10)
    assert returned, "submit_batch is still waiting for a journal that is gone"
    for future in returned[0]:
        with pytest.raises(NotRunningError, match="the journal thread of agent for site-a"):
            future.result(10)
    failure = agent.failed
    assert failure is not None
    assert failure.kind == "journal"
    assert heard == [failure]
    assert not agent.ready
    assert failures(agent, "journal") == 1
    ready = http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["failed"] == (
        "the journal thread of agent for site-a failed: RuntimeError: injected fault in the "
        "journal thread"
    )
    with pytest.raises(NotRunningError, match="stopped serving: the journal thread"):
        agent.submit(frames(1)[0])
    assert logged(caplog, "the journal thread failed")


def test_attack_a_fault_that_escapes_the_deadline_loop_ends_the_agents_serving_for_good(
    bundle_factory, agent_factory, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    agent = agent_factory(bundle_factory(**FORWARD_ALL), cloud_timeout_ms=60_000)
    future = agent.submit_batch(frames(1))[0]  # no cloud: the caller waits
    delivery = agent._delivery
    monkeypatch.setattr(
        delivery, "expire_waits", fail_first(1, delivery.expire_waits, "injected deadline fault")
    )
    assert until(lambda: agent.failed is not None)
    failure = agent.failed
    assert failure is not None
    assert failure.kind == "deadlines"
    with pytest.raises(NotRunningError, match="the deadlines thread"):
        future.result(10)  # its deadline would never come: it is answered now
    assert not agent.ready
    assert failures(agent, "deadlines") == 1


# the command: a real process exits 70 with one error line

_BOOT = """
import sys
{patch}
from fogline.cli import main
sys.argv = ["fogline", *sys.argv[1:]]
main()
"""

_PATCHES = {
    "journal": (
        "from fogline.edge_agent._delivery import DeliveryCore\n"
        "def boom(self, n):\n"
        "    raise RuntimeError('injected fault in the journal thread')\n"
        "DeliveryCore.journal_done = boom\n",
        "error: the journal thread of agent for cli-site failed: RuntimeError: injected fault "
        "in the journal thread",
    ),
    "deadlines": (
        "from fogline.edge_agent._delivery import DeliveryCore\n"
        "def boom(self, now):\n"
        "    raise RuntimeError('injected fault in the deadline loop')\n"
        "DeliveryCore.expire_waits = boom\n",
        "error: the deadlines thread of agent for cli-site failed: RuntimeError: injected "
        "fault in the deadline loop",
    ),
    "http server": (
        "import uvicorn\n"
        "async def boom(self):\n"
        "    raise RuntimeError('injected fault in the server loop')\n"
        "uvicorn.Server.main_loop = boom\n",
        "error: the HTTP server failed: RuntimeError: injected fault in the server loop",
    ),
}


@pytest.mark.parametrize("kind", list(_PATCHES))
def test_attack_agent_run_exits_70_with_an_error_line_when_a_thread_fails_for_good(
    broker, bundle_factory, kind: str
) -> None:  # type: ignore[no-untyped-def]
    patch, expected = _PATCHES[kind]
    bundle = bundle_factory(**FORWARD_ALL)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BOOT.format(patch=patch),
            "agent",
            "run",
            "--broker",
            broker.url,
            "--site",
            "cli-site",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if kind == "journal":  # one forwarded input reaches the journal
            base = f"http://127.0.0.1:{port}"
            assert until(lambda: _ready(base) or proc.poll() is not None, 60)
            with contextlib.suppress(httpx.TransportError):  # it may be gone before it answers
                httpx.post(f"{base}/v1/infer", json={"data": frames(1)[0].tolist()}, timeout=10)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 70, err
    assert err.strip().splitlines()[-1] == expected


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
