"""An API fuzz run of the cloud's HTTP API, as ``fogline cloud serve --model-repository
--tokens`` serves it: a real model repository (onnxruntime) with a worker on a real
Mosquitto, behind a real uvicorn server (``test_scopes.serve_stack``).

Schemathesis generates requests from the app's own OpenAPI document for the inference
routes; Hypothesis generates them for the routes the document leaves out (model
repository, results, metrics, health). Every generated request is sent once per caller:
no token, a malformed ``Authorization`` header, a token the server does not hold
(revoked or made up), and a token of each scope (``infer``, ``read``, ``admin``). Each
answer must be the one the scope table of docs/cloud.md gives that caller on that route
(401 without a valid token, 403 for a token without the scope, otherwise never 401/403),
a status the route documents and never a 5xx but a documented 503, an error body of the
documented shape ``{"error": "…"}``, and must repeat no token, neither the one sent nor
any other.

Bounded: 195 examples in all (each sent six times; a few seconds here). The examples
differ from run to run; the seed is printed and attached to a failure
(``FOGLINE_FUZZ_SEED=<seed>`` repeats a run).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import posixpath
import re
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import event, given, note
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fogline.cloud_service._auth import TOKEN_PREFIX, Scope
from tests.cloud_service.test_oip_app import Tokens, make_tokens
from tests.cloud_service.test_scopes import SCOPE_TABLE, Stack, scope_for, serve_stack
from tests.fuzzing import any_text, fuzz, reproducible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SCHEMA_EXAMPLES = 12  # per inference operation (9 of them)
ROUTE_EXAMPLES = 7  # per other route (9 of them, unknown paths included)
MAX_REQUEST_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return make_tokens()


@pytest.fixture(scope="module")
def stack(
    module_broker: Any, tokens: Tokens, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with serve_stack(
        tmp_path_factory.mktemp("fuzz"),
        broker=module_broker,
        auth=tokens.store,
        max_request_bytes=MAX_REQUEST_BYTES,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(stack: Stack) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{stack.url}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


# -- callers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the ``Authorization`` header (None: none at all) and the scopes
    its token holds (None: not a valid token)."""

    name: str
    authorization: str | None
    scopes: frozenset[Scope] | None

    def allows(self, scope: Scope | None) -> bool:
        if scope is None:
            return True
        return self.scopes is not None and (scope in self.scopes or Scope.ADMIN in self.scopes)


_HEADER_TEXT = string.ascii_letters + string.digits + string.punctuation


def malformed_headers(tokens: Tokens) -> st.SearchStrategy[str]:
    """``Authorization`` values that are not ``Bearer <token>``: other schemes, no token,
    a valid admin token without its scheme, or any printable text."""
    basic = base64.b64encode(f"ops:{tokens.admin}".encode()).decode()
    return st.one_of(
        st.sampled_from(
            [
                tokens.admin,
                f"Basic {basic}",
                "Bearer",
                "Bearer    ",
                f"Token {tokens.admin}",
                f"Bearer{tokens.admin}",
                f"Bearer\t{tokens.admin}",
            ]
        ),
        st.text(_HEADER_TEXT, min_size=1, max_size=80).filter(
            lambda s: not s.lower().startswith("bearer")
        ),
    )


def unknown_tokens(tokens: Tokens) -> st.SearchStrategy[str]:
    """Tokens of the right form that the server does not hold: revoked or made up, a
    valid one with a character changed or missing, one of another case."""
    made_up = st.text(string.ascii_letters + string.digits + "-_", min_size=20, max_size=60)
    return st.one_of(
        made_up.map(lambda s: TOKEN_PREFIX + s),
        st.sampled_from([tokens.admin[:-1], tokens.admin + "x", tokens.admin.upper()]),
    )


def callers(tokens: Tokens, malformed: str, unknown: str) -> list[Caller]:
    return [
        Caller("no token", None, None),
        Caller("malformed", malformed, None),
        Caller("unknown token", f"Bearer {unknown}", None),
        Caller("infer", f"Bearer {tokens.infer}", frozenset({Scope.INFER})),
        Caller("read", f"Bearer {tokens.read}", frozenset({Scope.READ})),
        Caller("admin", f"Bearer {tokens.admin}", frozenset({Scope.ADMIN})),
    ]


# -- what every answer must be ----------------------------------------------------------


def check_answer(
    method: str,
    route: str,
    caller: Caller,
    tokens: Tokens,
    status: int,
    headers: dict[str, str],
    body: bytes,
    documented: set[int] | None = None,
) -> None:
    """The checks every answer gets (``documented``: the route's statuses, for routes the
    OpenAPI document leaves out; schemathesis checks the others)."""
    scope = scope_for(method, route)
    where = f"{method} {route} as {caller.name}: {status} {body[:300]!r}"
    assert status < 500 or status == 503, where
    if not caller.allows(scope):
        expected = 401 if caller.scopes is None else 403
        assert status == expected, where
        challenge = headers.get("www-authenticate", "")
        assert challenge.startswith('Bearer realm="fogline"'), where
        if expected == 403:
            assert f'error="insufficient_scope", scope="{scope}"' in challenge, where
    else:
        assert status not in (401, 403), where
    if documented is not None:
        assert status in documented | {401, 403}, where
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), where
        error = json.loads(body)
        assert isinstance(error, dict), where
        assert isinstance(error.get("error"), str), where
    secrets = [tokens.infer, tokens.read, tokens.admin, tokens.both]
    if caller.authorization is not None and len(caller.authorization) >= 20:
        secrets.append(caller.authorization.removeprefix("Bearer "))
    text = body.decode("utf-8", "replace") + "\n".join(f"{k}: {v}" for k, v in headers.items())
    for secret in secrets:
        assert secret not in text, f"{where}: the answer repeats a token"


def same_outcome(route: str, statuses: dict[str, int], allowed: list[Caller]) -> None:
    """Callers allowed on a route get the same status for the same request (a 503 aside: a
    deadline can pass for one and not the other)."""
    seen = {statuses[c.name] for c in allowed}
    if len(seen) > 1 and 503 not in seen:
        raise AssertionError(f"{route}: allowed callers got different answers: {statuses}")


# -- the inference routes, from the OpenAPI document ------------------------------------

OPERATIONS = [
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{model}"),
    ("GET", "/v2/models/{model}/versions/{version}"),
    ("GET", "/v2/models/{model}/ready"),
    ("GET", "/v2/models/{model}/versions/{version}/ready"),
    ("POST", "/v2/models/{model}/infer"),
    ("POST", "/v2/models/{model}/versions/{version}/infer"),
]
# Random model names only reach the 404 answer; a path pinned to a served model sends the
# generated bodies and headers through decoding, validation and the model itself.
PINNED = [
    {"model": "sum_product", "version": "2"},
    {"model": "identity_bytes", "version": "1"},
    {"model": "tiny", "version": "1"},  # the bundle's cloud part
]
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def test_the_fuzz_run_covers_every_route(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]
    assert {(op.method.upper(), op.path) for op in operations} == set(OPERATIONS)
    fuzzed = set(OPERATIONS) | {(m, p) for m, p, _ in ROUTES}
    assert fuzzed == {(row.method, row.path) for row in SCOPE_TABLE if row.access["tokens"].served}


def _case_strategy(operation: Any, path: str) -> st.SearchStrategy[Any]:
    choices = [operation.as_strategy(generation_mode=GenerationMode.POSITIVE)]
    if "{" in path:
        for pinned in PINNED:
            params = {k: v for k, v in pinned.items() if "{" + k + "}" in path}
            choices += [
                operation.as_strategy(generation_mode=mode, path_parameters=params)
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            ]
    return st.one_of(choices)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_attack_no_generated_request_from_any_caller_gets_an_undocumented_answer(
    stack: Stack,
    api_schema: schemathesis.BaseSchema,
    session: requests.Session,
    tokens: Tokens,
    method: str,
    path: str,
) -> None:
    operation = api_schema[path][method]
    base_url = stack.url

    @fuzz(f"{method} {path}", SCHEMA_EXAMPLES)
    @given(
        case=_case_strategy(operation, path),
        malformed=malformed_headers(tokens),
        unknown=unknown_tokens(tokens),
    )
    def run(case: schemathesis.Case, malformed: str, unknown: str) -> None:  # type: ignore[type-arg]
        # The request is sent here rather than by ``case.call``: schemathesis leaves out an
        # Authorization header of its own accord for some negative cases.
        request = case.as_transport_kwargs(base_url=base_url)
        generated = {
            k: v for k, v in request.pop("headers").items() if k.lower() != "authorization"
        }
        statuses: dict[str, int] = {}
        everyone = callers(tokens, malformed, unknown)
        for caller in everyone:
            auth = {} if caller.authorization is None else {"Authorization": caller.authorization}
            note(f"caller: {caller.name}; request: {request!r}, headers {generated!r}")
            response = session.request(
                **request, headers={**generated, **auth}, timeout=30, allow_redirects=False
            )
            assert response.request.headers.get("Authorization") == caller.authorization
            case.validate_response(response, checks=SCHEMA_CHECKS)
            check_answer(
                method,
                path,
                caller,
                tokens,
                response.status_code,
                {k.lower(): v for k, v in response.headers.items()},
                response.content,
            )
            statuses[caller.name] = response.status_code
        same_outcome(path, statuses, [c for c in everyone if c.allows(scope_for(method, path))])

    reproducible(run)


# -- the routes the OpenAPI document leaves out -----------------------------------------

# Documented answers besides 401/403 (docs/inference-api.md, docs/cloud.md).
ROUTES: list[tuple[str, str, set[int]]] = [
    ("POST", "/v2/repository/index", {200}),
    ("POST", "/v2/repository/models/{model}/load", {200, 400, 404, 503}),
    ("POST", "/v2/repository/models/{model}/unload", {200, 400, 404, 503}),
    ("GET", "/v1/results/{site}/{message_id}", {200, 400, 404, 503}),
    ("GET", "/metrics", {200}),
    ("GET", "/healthz", {200}),
    ("GET", "/readyz", {200, 503}),
    ("GET", "/openapi.json", {200}),
]
_OTHER_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def _segment() -> st.SearchStrategy[str]:
    """A path parameter: a served model's name, text of any sort (NUL, '/', '..', non-ASCII
    included), or a name longer than any file name may be."""
    return st.one_of(
        st.sampled_from(["spare", "sum_product", "tiny", "nope", ".", "..", "0" * 32]),
        st.text(min_size=1, max_size=40),
        st.integers(256, 4000).map(lambda n: "m" * n),
        st.uuids().map(str),
    )


@st.composite
def route_requests(draw: st.DrawFn, method: str, path: str) -> dict[str, Any]:
    """One request to ``path``: its own method mostly, another sometimes (405); generated
    path parameters, query string, headers and body."""
    params = {
        name: draw(_segment())
        for name in ("model", "site", "message_id", "version")
        if "{" + name + "}" in path
    }
    # `unload` of a model the other tests run would only make their answers 503.
    if path.endswith("/unload") and params["model"] in ("sum_product", "tiny"):
        params["model"] = "spare"
    url = path.format(**{k: quote(v, safe="") for k, v in params.items()})
    query = draw(
        st.dictionaries(
            st.sampled_from(["version", "x", "model"]), st.text(max_size=30) | st.just("1")
        )
    )
    headers = draw(
        st.dictionaries(
            st.sampled_from(["Content-Type", "Content-Encoding", "Accept", "X-Anything"]),
            st.text(_HEADER_TEXT, max_size=40),
            max_size=3,
        )
    )
    body = draw(
        st.one_of(st.just(b""), st.binary(max_size=512), st.text(max_size=200).map(str.encode))
    )
    verb = draw(st.sampled_from([method] * 4 + _OTHER_METHODS))
    return {"method": verb, "url": url, "params": query, "headers": headers, "data": body}


@pytest.mark.parametrize(
    ("method", "path", "documented"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES]
)
def test_attack_no_generated_request_to_the_other_routes_gets_an_undocumented_answer(
    stack: Stack,
    session: requests.Session,
    tokens: Tokens,
    method: str,
    path: str,
    documented: set[int],
) -> None:
    @fuzz(f"{method} {path}", ROUTE_EXAMPLES)
    @given(
        request=route_requests(method, path),
        malformed=malformed_headers(tokens),
        unknown=unknown_tokens(tokens),
    )
    def run(request: dict[str, Any], malformed: str, unknown: str) -> None:
        statuses: dict[str, int] = {}
        everyone = callers(tokens, malformed, unknown)
        for caller in everyone:
            note(f"caller: {caller.name}, request: {request}")
            headers = dict(request["headers"])
            if caller.authorization is not None:
                headers["Authorization"] = caller.authorization
            r = session.request(
                **{**request, "url": stack.url + request["url"], "headers": headers},
                timeout=30,
                allow_redirects=False,
            )
            route_status = r.status_code
            if request["method"] != method:
                # Another method: 405 (or 404 where the path no longer matches), token or not.
                assert route_status in (404, 405), (request, caller.name, r.text)
                assert set(r.json()) == {"error"}
                continue
            if r.status_code == 404 and _unmatched(r):
                # A parameter holding '/' (or '..') makes another path: an unknown route.
                assert set(r.json()) == {"error"}
                continue
            check_answer(
                method,
                path,
                caller,
                tokens,
                r.status_code,
                {k.lower(): v for k, v in r.headers.items()},
                r.content,
                documented,
            )
            statuses[caller.name] = r.status_code
        if statuses and not path.startswith("/v2/repository/models"):
            same_outcome(path, statuses, [c for c in everyone if c.allows(scope_for(method, path))])

    reproducible(run)


def _unmatched(response: requests.Response) -> bool:
    return bool(response.json() == {"error": "Not Found"})


def test_attack_unknown_paths_are_404_in_the_error_shape_from_any_caller(
    stack: Stack, session: requests.Session, tokens: Tokens
) -> None:
    known = [row.path for row in SCOPE_TABLE]

    @fuzz("unknown paths", ROUTE_EXAMPLES)
    @given(
        path=st.text(string.ascii_letters + string.digits + "._-~", min_size=1, max_size=60),
        prefix=st.sampled_from(["/", "/v2/", "/v2/models/", "/v1/", "/v2/repository/"]),
        method=st.sampled_from(_OTHER_METHODS),
        malformed=malformed_headers(tokens),
        unknown=unknown_tokens(tokens),
    )
    def run(path: str, prefix: str, method: str, malformed: str, unknown: str) -> None:
        url = prefix + path
        # What the server sees: the client drops dot segments, and a known route with a
        # slash added is redirected to the route (Starlette's redirect_slashes).
        seen = posixpath.normpath(url)
        if any(_matches(template, seen) for template in known):
            return
        for caller in callers(tokens, malformed, unknown):
            headers = (
                {} if caller.authorization is None else {"Authorization": caller.authorization}
            )
            r = session.request(
                method, stack.url + url, headers=headers, timeout=30, allow_redirects=False
            )
            assert r.status_code == 404, (method, url, caller.name, r.text)
            assert r.json() == {"error": "Not Found"}
            secrets = [tokens.infer, tokens.read, tokens.admin, tokens.both]
            assert not any(s in r.text for s in secrets)

    reproducible(run)


def _matches(template: str, url: str) -> bool:
    pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
    return re.fullmatch(pattern, url) is not None


# -- inference requests that nearly fit the model --------------------------------------

# The served models' inputs: (name, datatype, width); every one batches on its first axis.
MODEL_INPUTS = {
    "sum_product": [("a", "FP32", 4), ("b", "FP32", 4)],
    "identity_bytes": [("x", "BYTES", 3)],
    "tiny": [("features", "FP32", 16)],
}
_DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES"]


# What a near-valid request may get wrong; each example breaks none, one or two of them.
_FLAWS = [
    "rows",
    "inputs",
    "datatype",
    "shape",
    "count",
    "values",
    "binary size",
    "header length",
    "encoding",
    "parameters",
    "outputs",
]


def _element(datatype: str, flawed: bool) -> st.SearchStrategy[Any]:
    """A JSON value of ``datatype`` (finite floats, in-range integers, text for
    ``BYTES``), or of any kind when ``flawed``."""
    own = {
        "BOOL": st.booleans(),
        "BYTES": any_text(8),
        "FP32": st.floats(width=32, allow_nan=False, allow_infinity=False),
    }[datatype]
    if not flawed:
        return own
    odd = st.floats() | st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=3)
    return st.one_of(own, odd, st.none())


def _few(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A few values, repeated to fill a tensor (drawing thousands one by one is slow)."""
    return st.lists(elements, min_size=1, max_size=6)


@st.composite
def near_valid_requests(draw: st.DrawFn, model: str) -> dict[str, Any]:
    """An inference request for ``model`` that fits it but for a flaw or two (see
    ``_FLAWS``): as JSON, or with binary tensors, compressed or not."""
    flaws = draw(st.sets(st.sampled_from(_FLAWS), max_size=2))
    rows = draw(st.sampled_from([0, 33, 1000]) if "rows" in flaws else st.integers(1, 32))
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    chosen = list(MODEL_INPUTS[model])
    if "inputs" in flaws:
        chosen = draw(st.permutations([*chosen, ("extra", "FP32", 2), chosen[0]]))
        chosen = chosen[: draw(st.integers(0, len(chosen)))]
    for name, datatype, width in chosen:
        dtype = draw(st.sampled_from(_DATATYPES)) if "datatype" in flaws else datatype
        shape = [rows, width]
        if "shape" in flaws:
            shape = draw(st.lists(st.integers(-2, 40), max_size=4))
        count = math.prod(shape) if all(d >= 0 for d in shape) else 3
        if "count" in flaws:
            count += draw(st.sampled_from([-1, 1, 7]))
        count = max(0, min(count, 100_000))
        tensor: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if datatype == "FP32" and draw(st.booleans()):
            # Binary: little-endian float32 after the JSON header.
            raw = np.resize(np.asarray(draw(_few(st.floats(width=32))), "<f4"), count).tobytes()
            size = len(raw)
            if "binary size" in flaws:
                size += draw(st.sampled_from([-4, -1, 1, 4]))
            tensor["parameters"] = {"binary_data_size": size}
            blobs.append(raw)
        else:
            few = draw(_few(_element(datatype, "values" in flaws)))
            flat = (few * (count // len(few) + 1))[:count]
            nested = draw(st.booleans()) and len(flat) == rows * width
            tensor["data"] = (
                [flat[i : i + width] for i in range(0, len(flat), width)] if nested else flat
            )
        inputs.append(tensor)
    document: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        document["id"] = draw(any_text(20))
    parameters: dict[str, Any] = {}
    if draw(st.booleans()):
        parameters["timeout_ms"] = 30_000
    if "parameters" in flaws:
        parameters.update(
            draw(
                st.dictionaries(
                    st.sampled_from(["timeout_ms", "timeout", "binary_data_output", "x"]),
                    st.floats() | st.integers(-(2**70), 2**70) | st.booleans() | st.text(),
                    min_size=1,
                    max_size=3,
                )
            )
        )
    if parameters:
        document["parameters"] = parameters
    if "outputs" in flaws or draw(st.booleans()):
        names = ["sum", "product", "y", "probs"] + (["nope"] if "outputs" in flaws else [])
        document["outputs"] = [
            {"name": name, "parameters": {"binary_data": draw(st.booleans())}}
            for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
        ]
    header = json.dumps(document).encode()  # NaN and Infinity as Python writes them
    body = header + b"".join(blobs)
    headers = {"Content-Type": "application/json"}
    if blobs or "header length" in flaws:
        length = len(header)
        if "header length" in flaws:
            length = draw(st.sampled_from([0, length - 1, length + 1, len(body) + 1, -1]))
        headers["Inference-Header-Content-Length"] = str(length)
    encoding = draw(st.sampled_from(["identity", "gzip", "deflate"]))
    if "encoding" in flaws:
        encoding = draw(st.sampled_from(["br", "gzip-truncated", "x"]))
    if encoding in ("gzip", "gzip-truncated"):
        body = gzip.compress(body)
        body = body[: len(body) // 2] if encoding == "gzip-truncated" else body
        encoding = "gzip"
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding != "identity" or draw(st.booleans()):
        headers["Content-Encoding"] = encoding
    event(f"flaws: {sorted(flaws)}")
    return {"document": document, "blobs": blobs, "headers": headers, "data": body}


def _sum_product_answer(document: dict[str, Any], response: requests.Response) -> None:
    """For a JSON answer of ``sum_product`` version 2: ``sum = a + b + 100`` and
    ``product = a * b``, in float32, as numpy computes them."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    given = {t["name"]: t for t in document["inputs"]}
    a, b = (np.asarray(given[n]["data"], dtype=np.float32).reshape(-1, 4) for n in ("a", "b"))
    with np.errstate(all="ignore"):
        want = {"sum": a + b + np.float32(100), "product": a * b}
    for output in response.json()["outputs"]:
        got = np.asarray(output["data"], dtype=np.float64).astype(np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(got, want[output["name"]])


INFER_ROUTES = ["/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"]
INFER_EXAMPLES = 12  # per route, over the three models


@pytest.mark.parametrize("path", INFER_ROUTES)
def test_attack_inference_requests_that_nearly_fit_never_fail_the_server(
    stack: Stack, session: requests.Session, tokens: Tokens, path: str
) -> None:
    @fuzz(f"near-valid {path}", INFER_EXAMPLES)
    @given(
        model=st.sampled_from(sorted(MODEL_INPUTS)),
        data=st.data(),
        malformed=malformed_headers(tokens),
        unknown=unknown_tokens(tokens),
    )
    def run(model: str, data: st.DataObject, malformed: str, unknown: str) -> None:
        request = data.draw(near_valid_requests(model))
        version = {"sum_product": "2", "identity_bytes": "1", "tiny": "1"}[model]
        url = stack.url + path.format(model=model, version=version)
        statuses: dict[str, int] = {}
        everyone = callers(tokens, malformed, unknown)
        for caller in everyone:
            headers = dict(request["headers"])
            if caller.authorization is not None:
                headers["Authorization"] = caller.authorization
            r = session.post(url, data=request["data"], headers=headers, timeout=30)
            note(f"{caller.name}: {r.status_code} {r.text[:300]}")
            check_answer(
                "POST",
                path,
                caller,
                tokens,
                r.status_code,
                {k.lower(): v for k, v in r.headers.items()},
                r.content,
                {200, 400, 413, 415, 503},
            )
            statuses[caller.name] = r.status_code
            if r.status_code == 200 and model == "sum_product" and not request["blobs"]:
                _sum_product_answer(request["document"], r)
        event(f"{model}: {statuses['infer']}")
        same_outcome(path, statuses, [c for c in everyone if c.allows(Scope.INFER)])

    reproducible(run)


def test_the_fuzz_run_is_bounded_to_200_examples() -> None:
    examples = (
        len(OPERATIONS) * SCHEMA_EXAMPLES
        + (len(ROUTES) + 1) * ROUTE_EXAMPLES  # the unknown paths too
        + len(INFER_ROUTES) * INFER_EXAMPLES
    )
    assert examples == 195


def test_after_the_fuzz_run_the_server_is_ready_and_answers_a_valid_request(
    http: httpx.Client, tokens: Tokens
) -> None:
    assert http.get("/v2/health/ready").json() == {"ready": True}
    r = http.post(
        "/v2/models/sum_product/versions/2/infer",
        headers=tokens.header("infer"),
        json={
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
                {"name": "b", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]},
            ],
            "outputs": [{"name": "sum"}],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [102.0, 103.0, 104.0, 105.0]
