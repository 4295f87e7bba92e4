"""The scope table of docs/cloud.md, held against what ``fogline cloud serve`` serves.

The table is parsed from the document; the apps are built as the command builds them
(``create_serving_app`` over a real model repository, with and without a worker on a real
Mosquitto, with a token file or ``insecure_no_auth``; ``create_app`` over a worker alone)
and served by real uvicorn servers. Every route of every mode must be a row of the table
and every row a route; every route must answer no token, a bad token and a token of each
scope as its cell says. ``test_oip_fuzz.py`` reads the same table for what it expects.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Route

from fogline._mqtt import MqttSettings
from fogline.cloud_service import CloudConfig, StoreConfig
from fogline.cloud_service._app import create_app, create_serving_app
from fogline.cloud_service._auth import Scope, TokenStore, generate_token
from fogline.cloud_service._metrics import CloudMetrics
from fogline.cloud_service._repository import ModelRepository, bundle_model_config
from fogline.cloud_service._store import ResultStore
from fogline.cloud_service._worker import CloudWorker
from tests.cloud_service.test_app import ServerThread
from tests.cloud_service.test_oip_app import (
    Tokens,
    identity_model,
    make_tokens,
    sum_product_model,
)
from tests.conftest import REPO, make_tiny_bundle

pytestmark = pytest.mark.integration

DOC = REPO / "docs" / "cloud.md"
TOKENS, INSECURE, MQTT_ONLY = "tokens", "insecure", "mqtt-only"
MODES = (TOKENS, INSECURE, MQTT_ONLY)
_COLUMNS = {
    "`--tokens FILE`": TOKENS,
    "`--insecure-no-auth`": INSECURE,
    "no `--model-repository`": MQTT_ONLY,
}
_CELL = re.compile(r"(?P<need>open|`(?P<scope>infer|read|admin)`|—)(?P<broker> \(with a broker\))?")


@dataclass(frozen=True)
class Access:
    """One cell: not served (``served`` false), open (``scope`` None) or a scope; some
    routes are served only when the MQTT ingest runs (``needs_broker``)."""

    served: bool
    scope: Scope | None
    needs_broker: bool


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    access: dict[str, Access]


def read_scope_table(doc: Path = DOC) -> list[Row]:
    """The rows of the scope table under "## Scopes" in ``doc``."""
    text = doc.read_text(encoding="utf-8")
    found = re.search(r"^## Scopes.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if found is None:
        raise ValueError(f"{doc} has no '## Scopes' section")
    section = found.group(0)
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if header[:2] != ["method", "path"] or set(header[2:]) != set(_COLUMNS):
        raise ValueError(f"docs/cloud.md: unexpected scope table header {header}")
    modes = [_COLUMNS[c] for c in header[2:]]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        method, path = cells[0], cells[1].strip("`")
        access = {}
        for mode, cell in zip(modes, cells[2:], strict=True):
            match = _CELL.fullmatch(cell)
            if match is None:
                raise ValueError(f"docs/cloud.md: {method} {path}: cannot read cell {cell!r}")
            scope = match.group("scope")
            access[mode] = Access(
                served=match.group("need") != "—",
                scope=Scope(scope) if scope else None,
                needs_broker=match.group("broker") is not None,
            )
        rows.append(Row(method, path, access))
    return rows


SCOPE_TABLE = read_scope_table()


def scope_for(method: str, path: str) -> Scope | None:
    """The scope the table says a route needs with a token file (None: open)."""
    for row in SCOPE_TABLE:
        if (row.method, row.path) == (method, path):
            return row.access[TOKENS].scope
    raise KeyError(f"{method} {path} is not in the scope table of docs/cloud.md")


# -- the served stack, as `fogline cloud serve` builds it ---------------------------------


def write_model_repository(root: Path) -> Path:
    """A Triton-layout directory: ``sum_product`` versions 1 and 2 (FP32 ``a``, ``b`` →
    ``sum``, ``product``; version 2 adds 100 to ``sum``), ``identity_fp32`` and
    ``identity_bytes`` (``x`` → ``y``), and ``spare`` (an FP32 identity for load and
    unload to play with)."""
    models = {
        ("sum_product", 1): sum_product_model(0.0),
        ("sum_product", 2): sum_product_model(100.0),
        ("identity_fp32", 1): identity_model("FP32"),
        ("identity_bytes", 1): identity_model("BYTES"),
        ("spare", 1): identity_model("FP32"),
    }
    for (name, version), onnx_bytes in models.items():
        folder = root / name / str(version)
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(onnx_bytes)
    return root


@dataclass
class Stack:
    server: ServerThread
    app: FastAPI
    repository: ModelRepository | None
    worker: CloudWorker | None

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def serve_stack(
    root: Path,
    *,
    broker: Any | None,
    auth: TokenStore | None = None,
    insecure_no_auth: bool = False,
    model_repository: bool = True,
    max_request_bytes: int = 256 * 1024,
) -> Iterator[Stack]:
    """What ``fogline cloud serve`` runs, on a real uvicorn server: a model repository
    over :func:`write_model_repository` plus the tiny bundle (unless
    ``model_repository`` is false), and a worker ingesting MQTT when ``broker`` is given."""
    bundle = make_tiny_bundle(root / "bundle")
    metrics = CloudMetrics()
    repo: ModelRepository | None = None
    worker: CloudWorker | None = None
    store: ResultStore | None = None
    config = CloudConfig(
        broker=None
        if broker is None
        else MqttSettings(
            host=broker.host, port=broker.port, topic_prefix=f"scopes/{uuid.uuid4().hex[:8]}"
        ),
        share_group="fogline-cloud",
        bundles=(bundle,),
        store=StoreConfig(f"sqlite:///{root / 'results.db'}"),
        worker_id=f"w-{uuid.uuid4().hex[:6]}",
    )
    try:
        if broker is not None:
            store = ResultStore(config.store.url)
        if model_repository:
            repo = ModelRepository(
                write_model_repository(root / "models"),
                bundles=config.bundles,
                backend="onnxruntime",
                bundle_config=bundle_model_config(config.batching),
                metrics=metrics,
            )
            repo.start()
        if broker is not None:
            worker = CloudWorker(config, metrics=metrics, repository=repo, store=store)
            worker.start(wait=False)
        if repo is not None:
            app = create_serving_app(
                repo,
                worker=worker,
                metrics=metrics,
                auth=auth,
                insecure_no_auth=insecure_no_auth,
                max_request_bytes=max_request_bytes,
                cors_origins=(),
            )
        else:
            assert worker is not None, "without a model repository the worker is the app"
            app = create_app(worker)
        with ServerThread(app) as server:
            yield Stack(server, app, repo, worker)
    finally:
        if worker is not None:
            worker.stop()
        if repo is not None:
            repo.stop()
        if store is not None:
            store.close()


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route of ``app`` (HEAD, which Starlette adds beside GET for
    plain routes, left out)."""
    out = set()
    for route in app.routes:
        if isinstance(route, Route):
            out.update((m, route.path) for m in (route.methods or ()) if m != "HEAD")
    return out


# -- the tests ----------------------------------------------------------------------------


def test_the_scope_table_has_a_row_for_each_route_and_a_known_cell_in_each_mode() -> None:
    assert len(SCOPE_TABLE) == len({(r.method, r.path) for r in SCOPE_TABLE})
    assert all(set(row.access) == set(MODES) for row in SCOPE_TABLE)
    # What the table says of the inference API matches the module that defines it.
    assert scope_for("POST", "/v2/models/{model}/infer") is Scope.INFER
    assert scope_for("GET", "/v2/health/ready") is None
    assert scope_for("POST", "/v2/repository/models/{model}/load") is Scope.ADMIN


def test_a_cell_the_table_cannot_hold_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "cloud.md"
    doc.write_text(
        "## Scopes\n\n| method | path | `--tokens FILE` | `--insecure-no-auth` | "
        "no `--model-repository` |\n| --- | --- | --- | --- | --- |\n"
        "| GET | `/v2` | `root` | open | — |\n"
    )
    with pytest.raises(ValueError, match="cannot read cell '`root`'"):
        read_scope_table(doc)


def _expected_routes(mode: str, *, broker: bool) -> set[tuple[str, str]]:
    return {
        (row.method, row.path)
        for row in SCOPE_TABLE
        if row.access[mode].served and (broker or not row.access[mode].needs_broker)
    }


@pytest.mark.parametrize(
    ("mode", "with_broker"),
    [(TOKENS, True), (TOKENS, False), (INSECURE, True), (INSECURE, False), (MQTT_ONLY, True)],
    ids=["tokens+broker", "tokens", "insecure+broker", "insecure", "mqtt-only"],
)
def test_the_scope_table_lists_exactly_the_routes_each_mode_serves(
    module_broker: Any, tmp_path: Path, mode: str, with_broker: bool
) -> None:
    with serve_stack(
        tmp_path,
        broker=module_broker if with_broker else None,
        auth=make_tokens().store if mode == TOKENS else None,
        insecure_no_auth=mode == INSECURE,
        model_repository=mode != MQTT_ONLY,
    ) as stack:
        assert served_routes(stack.app) == _expected_routes(mode, broker=with_broker)


# Path parameters for the probes: a model that exists (the repository routes get `spare`,
# so load and unload touch nothing else), a well-formed message id nobody stored.
_PARAMS = {"model": "sum_product", "version": "1", "site": "site-a", "message_id": "0" * 32}


def _probe_path(path: str) -> str:
    params = dict(_PARAMS, model="spare") if path.startswith("/v2/repository") else _PARAMS
    return path.format(**params)


def _revoked_token() -> str:
    secret, _entry = generate_token("gone", [Scope.ADMIN])
    return secret


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return make_tokens()


@pytest.fixture(scope="module")
def token_stack(
    module_broker: Any, tokens: Tokens, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with serve_stack(
        tmp_path_factory.mktemp("stack"), broker=module_broker, auth=tokens.store
    ) as s:
        yield s


@pytest.mark.parametrize("row", SCOPE_TABLE, ids=[f"{r.method} {r.path}" for r in SCOPE_TABLE])
def test_each_route_answers_each_token_as_the_scope_table_says(
    token_stack: Stack, tokens: Tokens, row: Row
) -> None:
    access = row.access[TOKENS]
    path = _probe_path(row.path)
    bad = {
        "none": {},
        "malformed": {"Authorization": tokens.admin},  # an admin token, without "Bearer "
        "revoked": {"Authorization": f"Bearer {_revoked_token()}"},
    }
    good = {scope: tokens.header(scope) for scope in ("infer", "read", "admin")}
    with httpx.Client(base_url=token_stack.url, timeout=30) as http:
        for name, headers in bad.items():
            r = http.request(row.method, path, headers=headers)
            if access.scope is None:
                assert r.status_code not in (401, 403), (name, r.status_code, r.text)
            else:
                assert r.status_code == 401, (name, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith('Bearer realm="fogline"')
                assert set(r.json()) == {"error"}
        for name, headers in good.items():
            r = http.request(row.method, path, headers=headers)
            allowed = access.scope is None or name in (access.scope.value, "admin")
            if allowed:
                assert r.status_code not in (401, 403), (name, r.status_code, r.text)
            else:
                assert r.status_code == 403, (name, r.status_code, r.text)
                assert f'scope="{access.scope}"' in r.headers["www-authenticate"]
                assert set(r.json()) == {"error"}


def test_with_insecure_no_auth_every_route_is_open_and_a_token_is_not_looked_at(
    module_broker: Any, tmp_path: Path
) -> None:
    rows = [r for r in SCOPE_TABLE if r.access[INSECURE].served]
    assert all(r.access[INSECURE].scope is None for r in rows)
    with (
        serve_stack(tmp_path, broker=module_broker, insecure_no_auth=True) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as http,
    ):
        for row in rows:
            for headers in ({}, {"Authorization": f"Bearer {_revoked_token()}"}):
                r = http.request(row.method, _probe_path(row.path), headers=headers)
                assert r.status_code not in (401, 403), (row.path, r.status_code, r.text)


def test_attack_a_model_name_longer_than_a_file_name_is_404_for_an_admin_load(
    token_stack: Stack, tokens: Tokens
) -> None:
    # Found by the fuzz run: the repository looked for the folder and the file system's
    # ENAMETOOLONG escaped as a 500.
    with httpx.Client(base_url=token_stack.url, timeout=30) as http:
        for action in ("load", "unload"):
            r = http.post(
                f"/v2/repository/models/{'m' * 300}/{action}", headers=tokens.header("admin")
            )
            assert r.status_code == 404, r.text
            assert r.json()["error"].startswith("unknown model 'mmm")
