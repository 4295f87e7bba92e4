"""An API fuzz run: schemathesis generates requests from the app's own OpenAPI schema and
sends them to a real uvicorn server over real onnxruntime models.

Bounded and deterministic (30 examples per operation, derandomized): whatever the body,
path or headers, the server must answer with a documented status code, never a 5xx
(the ``broken`` model, whose backend fails on purpose, is left out), with a body that
matches the schema.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.cloud_service.test_app import ServerThread
from tests.cloud_service.test_oip_app import Tokens, make_provider, make_tokens, serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return make_tokens()


@pytest.fixture(scope="module")
def server(tokens: Tokens) -> Iterator[ServerThread]:
    provider = make_provider()
    del provider.models["broken"]  # a backend failing on purpose is a documented 500
    with serve(provider, auth=tokens.store, max_request_bytes=256 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server: ServerThread) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# ``schemathesis.pytest.from_fixture`` fails under pytest 9 (it writes ``node._nodeid``),
# so each operation's strategy is driven by Hypothesis directly.
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
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_the_fuzz_run_covers_every_operation(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]
    assert {(op.method.upper(), op.path) for op in operations} == set(OPERATIONS)


# Random model names only ever reach the 404 answer; pinning the path to a real model
# (``sum_product``, version 2) sends the generated bodies and headers through decoding,
# validation and the model. Negative cases (data that breaks the schema) exist only where
# there is something to break: a path parameter or a body.
PINNED = {"model": "sum_product", "version": "2"}
RUNS = [(m, p, GenerationMode.POSITIVE, False) for m, p in OPERATIONS] + [
    (m, p, mode, True)
    for m, p in OPERATIONS
    if "{" in p
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
]


@pytest.mark.parametrize(
    ("method", "path", "mode", "pinned"),
    RUNS,
    ids=[f"{m} {p} {g.value}{' pinned' if pin else ''}" for m, p, g, pin in RUNS],
)
def test_no_generated_request_makes_the_server_fail(
    api_schema: schemathesis.BaseSchema,
    tokens: Tokens,
    method: str,
    path: str,
    mode: GenerationMode,
    pinned: bool,
) -> None:
    operation = api_schema[path][method]
    auth = tokens.header("admin")
    path_parameters = {k: v for k, v in PINNED.items() if "{" + k + "}" in path} if pinned else None

    @settings(
        max_examples=30,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
        case.call_and_validate(headers=auth, checks=CHECKS)

    run()
