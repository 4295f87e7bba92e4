"""An API fuzz run of the agent's local HTTP API, against a real running agent.

The agent runs a real tiny bundle (some inputs dropped, some answered at the edge, some
forwarded) on a real Mosquitto, with a stand-in cloud worker answering what it forwards,
behind a real uvicorn server, its body limit set low (16 KiB) so that bodies above it are
cheap to send. Hypothesis generates the requests: bodies that nearly fit the model, any
JSON at all, JSON nested thousands deep, bodies over the limit, bytes that are not JSON or
not UTF-8; Content-Type of any sort; Content-Length true, absent (chunked) or declaring
more than the limit; every method on every route, and unknown paths.

Every answer must be a documented status and never a 5xx; an error must have the
documented shape ``{"error": str, "type": str}`` (422 may add ``detail``); a body over the
limit must be 413; and afterwards the agent must still say it is ready and answer a valid
input. Bounded: 190 examples in all (a few seconds here); new ones each run, from a seed
that is printed and attached to a failure (``FOGLINE_FUZZ_SEED=<seed>`` repeats a run).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import posixpath
import string
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import given, note
from hypothesis import strategies as st
from starlette.routing import Route

from fogline._mqtt import MqttSettings
from fogline.edge_agent import Agent, AgentConfig, HttpConfig, OutboxConfig, RuntimeConfig
from tests.conftest import make_tiny_bundle
from tests.edge_agent.conftest import CloudResponder, frames
from tests.edge_agent.test_api import _Server
from tests.fuzzing import any_text, fuzz, mostly, reproducible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LIMIT = 16 * 1024  # http.max_body_bytes of the agent under test
INFER_EXAMPLES = 110
ROUTE_EXAMPLES = 8  # per other route (5 of them)
UNKNOWN_EXAMPLES = 10
LENGTH_EXAMPLES = 30


@dataclass
class Running:
    agent: Agent
    server: _Server
    url: str
    host: str
    port: int


@pytest.fixture(scope="module")
def running(module_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("agent-fuzz")
    bundle = make_tiny_bundle(root / "bundle", relevance=0.5, exit_confidence=0.9)
    prefix = f"fogline-fuzz/{uuid.uuid4().hex[:8]}"
    responder = CloudResponder(module_broker.host, module_broker.port, prefix, bundle)
    config = AgentConfig(
        site="fuzz",
        bundle_dir=bundle,
        broker=MqttSettings(host=module_broker.host, port=module_broker.port, topic_prefix=prefix),
        runtime=RuntimeConfig(max_batch=8, warmup_runs=1),
        http=HttpConfig(max_body_bytes=LIMIT),
        outbox=OutboxConfig(path=root / "outbox.db"),
    )
    try:
        with Agent(config) as agent:
            server = _Server(agent)
            try:
                url = str(server.client.base_url).rstrip("/")
                host, port = server.client.base_url.host, server.client.base_url.port
                assert port is not None
                yield Running(agent, server, url, host, port)
            finally:
                server.close()
    finally:
        responder.close()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


# -- what every answer must be ----------------------------------------------------------

# Documented answers of each route to its own method (docs/agent.md, "HTTP API").
ROUTES: dict[tuple[str, str], set[int]] = {
    ("POST", "/v1/infer"): {200, 400, 413, 422},
    ("GET", "/v1/info"): {200},
    ("GET", "/healthz"): {200},
    ("GET", "/readyz"): {200},  # the agent stays ready throughout
    ("GET", "/metrics"): {200},
    ("GET", "/openapi.json"): {200},
}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


def check_answer(method: str, path: str, status: int, headers: dict[str, str], body: bytes) -> None:
    where = f"{method} {path}: {status} {body[:300]!r}"
    assert status < 500, where
    route = posixpath.normpath(path.split("?", 1)[0])
    documented = ROUTES.get((method, route))
    if (method, route) == ("HEAD", "/openapi.json"):
        documented = {200}  # Starlette answers HEAD beside GET for its plain routes
    if documented is not None:
        assert status in documented, where
    elif any(p == route for _m, p in ROUTES):
        assert status == 405, where
    else:
        assert status == 404, where
    if status >= 400 and method != "HEAD":
        assert headers.get("content-type", "").startswith("application/json"), where
        error = json.loads(body)
        assert isinstance(error, dict), where
        assert {"error", "type"} <= set(error) <= {"error", "type", "detail"}, where
        assert isinstance(error["error"], str), where
        assert isinstance(error["type"], str), where
        assert "detail" not in error or status == 422, where


def test_the_fuzz_run_covers_every_route(running: Running) -> None:
    app = running.server.server.config.app
    served = {
        (m, r.path)
        for r in app.routes  # type: ignore[attr-defined]
        if isinstance(r, Route)
        for m in r.methods or ()
        if m != "HEAD"
    }
    assert served == set(ROUTES)


def test_the_fuzz_run_is_bounded_to_200_examples() -> None:
    other = len(ROUTES) - 1
    total = INFER_EXAMPLES + other * ROUTE_EXAMPLES + UNKNOWN_EXAMPLES + LENGTH_EXAMPLES
    assert total == 190


# -- bodies -----------------------------------------------------------------------------

_DTYPES = ["uint8", "int8", "int16", "int32", "int64", "float32", "float64", "bool", "complex"]


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value (text with lone surrogates and huge integers included)."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        any_text(12),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text(8), inner, max_size=5),
        max_leaves=max_leaves,
    )


# True about one time in six. (Hypothesis draws small integers, 0 above all, far more
# often than the rest, so ``integers(0, 5) == 0`` would be true most of the time.)
_rarely = st.sampled_from([False] * 5 + [True])


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """An infer body for the tiny bundle's uint8 [1, 8, 8] input, right or a little wrong."""
    document: dict[str, Any] = {}
    fitting = st.sampled_from([[1, 8, 8], [8, 8], [1, 1, 8, 8]])
    shape = draw(mostly(fitting, st.sampled_from([[64], [8, 9], [0], [-1, 8], [2, 1, 8, 8]])))
    count = max(0, math.prod(shape))
    if draw(st.booleans()):
        # nested lists
        values = draw(st.lists(st.integers(0, 255), min_size=1, max_size=8))
        flat = (values * (count // len(values) + 1))[:count]
        if flat and draw(_rarely):
            flat[draw(st.integers(0, count - 1))] = draw(json_values(3))
        data: Any = np.asarray(flat, dtype=object).reshape(shape).tolist() if count else []
        if len(shape) > 1 and count and draw(_rarely):
            row = data  # ragged: the first innermost row one element short
            while isinstance(row[0], list):
                row = row[0]
            row.pop()
        document["data"] = data
        if draw(st.booleans()):
            document["shape"] = draw(mostly(st.just(shape), st.sampled_from([[1, 8, 8], [3]])))
    else:
        dtype = draw(mostly(st.sampled_from([None, "uint8"]), st.sampled_from(_DTYPES)))
        size = count * np.dtype(dtype or "uint8").itemsize
        pattern = draw(st.binary(min_size=1, max_size=8))
        raw = (pattern * size)[:size]
        if draw(_rarely):
            raw = raw[:-1] if draw(st.booleans()) else raw + b"\0"
        document["b64"] = base64.b64encode(raw).decode()
        if draw(_rarely):
            document["b64"] = draw(st.sampled_from(["***", "AAA", document["b64"] + "="]))
        document["shape"] = shape
        if dtype is not None:
            document["dtype"] = dtype
    if draw(st.booleans()):
        long_tags = st.text(min_size=1000, max_size=1100)
        document["tag"] = draw(mostly(any_text(30), long_tags))
    if draw(st.booleans()):
        odd = st.integers(-(2**70), 2**70) | st.floats() | st.booleans() | st.text(max_size=4)
        document["priority"] = draw(mostly(st.integers(-(2**31), 2**31 - 1), odd))
    if draw(_rarely):
        document[draw(any_text(8))] = draw(json_values(3))
    return document


@st.composite
def infer_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["near"] * 5 + ["any", "deep", "huge", "bytes"]))
    if kind == "near":
        return json.dumps(draw(near_valid_bodies())).encode()
    if kind == "any":
        return json.dumps(draw(json_values())).encode()
    if kind == "deep":
        depth = draw(st.integers(10, LIMIT // 2 - 16))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"data":[', "]}")]))
        reps = min(depth, (LIMIT - 16) // (len(opener) + len(closer)))
        return (opener * reps + "0" + closer * reps).encode()
    if kind == "huge":
        pad = draw(st.integers(LIMIT - 10, 4 * LIMIT))
        return json.dumps({"data": [[1] * 8] * 8, "tag": "x" * pad}).encode()
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.just(b"\xef\xbb\xbf{}"),  # a UTF-8 byte order mark
            st.just(b'{"data": NaN}'),
            st.just(b'{"data": 1e999}'),
            st.just(b'{"data": [1], "data": [2]}'),
            st.just(b""),
        )
    )


_CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "garbage/;;==",  # (a control character would be refused by the HTTP parser itself)
]


def _chunks(body: bytes) -> Iterator[bytes]:
    for i in range(0, len(body), 4096):
        yield body[i : i + 4096]


def test_attack_no_generated_infer_request_fails_the_agent_or_breaks_the_error_shape(
    running: Running, session: requests.Session
) -> None:
    @fuzz("agent infer", INFER_EXAMPLES)
    @given(
        body=infer_bodies(),
        content_type=st.sampled_from(_CONTENT_TYPES),
        chunked=st.booleans(),
    )
    def run(body: bytes, content_type: str | None, chunked: bool) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        note(f"body ({len(body)} bytes): {body[:400]!r}, chunked: {chunked}, {headers}")
        data: Any = _chunks(body) if chunked else body
        r = session.post(f"{running.url}/v1/infer", data=data, headers=headers, timeout=30)
        check_answer("POST", "/v1/infer", r.status_code, dict(r.headers.lower_items()), r.content)
        if len(body) > LIMIT:
            assert r.status_code == 413, r.text
        if r.status_code == 200:
            answer = r.json()
            assert answer["source"] in ("dropped", "edge", "cloud"), answer
            sent = json.loads(body)
            assert answer["tag"] == (sent.get("tag") if isinstance(sent, dict) else None)

    reproducible(run)


# -- every route, every method, unknown paths --------------------------------------------


@pytest.mark.parametrize("path", sorted({p for _m, p in ROUTES if p != "/v1/infer"}))
def test_attack_every_method_on_every_route_gets_a_documented_answer(
    running: Running, session: requests.Session, path: str
) -> None:
    @fuzz(f"agent {path}", ROUTE_EXAMPLES)
    @given(
        method=st.sampled_from(METHODS),
        query=st.dictionaries(any_text(6), any_text(10), max_size=2),
        body=st.one_of(st.just(b""), st.binary(max_size=300), infer_bodies()),
        content_type=st.sampled_from(_CONTENT_TYPES),
    )
    def run(method: str, query: dict[str, str], body: bytes, content_type: str | None) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        params = {
            k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass")
            for k, v in query.items()
        }
        r = session.request(
            method,
            f"{running.url}{path}",
            params=params,
            data=body,
            headers=headers,
            timeout=30,
            allow_redirects=False,
        )
        note(f"{method} {r.url}: {r.status_code} {r.text[:300]}")
        check_answer(method, path, r.status_code, dict(r.headers.lower_items()), r.content)

    reproducible(run)


def test_attack_unknown_paths_get_404_in_the_error_shape(
    running: Running, session: requests.Session
) -> None:
    @fuzz("agent unknown paths", UNKNOWN_EXAMPLES)
    @given(
        path=st.text(string.ascii_letters + string.digits + "._-~/", min_size=1, max_size=60),
        method=st.sampled_from(METHODS),
    )
    def run(path: str, method: str) -> None:
        url = posixpath.normpath("/" + path)
        if any(p == url for _m, p in ROUTES):
            return
        r = session.request(method, running.url + url, timeout=30, allow_redirects=False)
        note(f"{method} {url}: {r.status_code} {r.text[:200]}")
        if r.status_code == 307:
            # A known route with a slash added (after the client dropped dot segments):
            # Starlette redirects to the route.
            target = r.headers["location"].removeprefix(running.url)
            assert any(p == target for _m, p in ROUTES), (url, target)
            return
        check_answer(method, url, r.status_code, dict(r.headers.lower_items()), r.content)

    reproducible(run)


# -- Content-Length as sent, not as a client library would set it ------------------------


def test_attack_a_content_length_over_the_limit_is_413_at_once_whatever_follows(
    running: Running,
) -> None:
    @fuzz("agent content-length", LENGTH_EXAMPLES)
    @given(
        declared=st.one_of(
            st.integers(LIMIT + 1, 4 * LIMIT), st.integers(LIMIT + 1, 10**15), st.just(LIMIT + 1)
        ),
        body=st.binary(max_size=64) | infer_bodies().map(lambda b: b[:512]),
        content_type=st.sampled_from(_CONTENT_TYPES),
    )
    def run(declared: int, body: bytes, content_type: str | None) -> None:
        # http.client sends the Content-Length given, and only the bytes given: an honest
        # server answers from the header, without waiting for the rest.
        headers = {"Content-Length": str(declared)}
        if content_type is not None:
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection(running.host, running.port, timeout=30)
        try:
            conn.request("POST", "/v1/infer", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        note(f"Content-Length {declared}, {len(body)} bytes sent: {response.status} {payload!r}")
        assert response.status == 413, payload
        check_answer(
            "POST",
            "/v1/infer",
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            payload,
        )
        assert json.loads(payload)["type"] == "RequestTooLarge"

    reproducible(run)


# -- afterwards ---------------------------------------------------------------------------


def test_after_the_fuzz_run_the_agent_is_ready_and_answers_a_valid_input(
    running: Running, session: requests.Session
) -> None:
    r = session.get(f"{running.url}/readyz", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"ready": True, "model": True, "mqtt": True, "failed": None}
    for frame in frames(4, seed=11):
        r = session.post(
            f"{running.url}/v1/infer", json={"data": frame.tolist(), "tag": "after"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["tag"] == "after"
        assert r.json()["source"] in ("dropped", "edge", "cloud")
    assert running.agent.ready
