"""The cloud worker's HTTP API: stored results, health, readiness and metrics.

A thin adapter over :class:`CloudWorker`; it neither starts nor stops the worker, so the
API can answer ``/healthz`` and ``/readyz`` (503) while the worker is still warming up.
``/readyz`` says why it is not ready (``reason``): still starting, no broker, a stalled
result store, or a thread that failed for good. A handler that raises something no handler
maps is answered 500 and counted (``fogline_cloud_thread_failures_total{thread="http"}``);
the server goes on.

Given a :class:`~fogline.cloud_service._sync.CloudSync` (``fogline cloud serve
--sync-home``), either app also serves the sync home's repositories and the nonce and
report routes (docs/cloud.md, "Sync"); those are open in every mode: all they serve is
signed, and a report is believed only when its site's key signed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from fogline.cloud_service._metrics import CONTENT_TYPE_LATEST
from fogline.cloud_service._store import normalize_message_id
from fogline.cloud_service._version import fogline_version
from fogline.cloud_service._worker import CloudWorker
from fogline.cloud_service.errors import StoreError
from fogline.messaging import ContainedHttp, Supervisor

if TYPE_CHECKING:
    from fogline.cloud_service._sync import CloudSync

__all__ = ["create_app", "create_serving_app"]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _supervise_http(app: FastAPI, supervisor: Supervisor) -> None:
    app.add_middleware(
        ContainedHttp,
        on_error=lambda route, exc: supervisor.contained("http", f"request {route}", exc),
        answer=lambda exc: _error(500, f"internal error ({type(exc).__name__}), logged"),
    )


def create_app(worker: CloudWorker, *, sync: CloudSync | None = None) -> FastAPI:
    """A FastAPI app serving ``worker``'s results and health (and ``sync``'s routes)."""
    app = FastAPI(
        title="fogline cloud worker",
        version=fogline_version(),
        docs_url=None,
        redoc_url=None,
    )
    _supervise_http(app, worker.supervisor)

    # Plain ``def`` handlers: FastAPI runs them in its thread pool, so a database read
    # never blocks the event loop.
    @app.get("/v1/results/{site}/{message_id}", response_model=None)
    def get_result(site: str, message_id: str) -> dict[str, Any] | JSONResponse:
        store = worker.store
        if store is None:
            return _error(503, "the result store is not open yet")
        try:
            normalize_message_id(message_id)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            result = store.get(site, message_id)
        except StoreError as exc:
            return _error(503, str(exc))
        if result is None:
            return _error(404, f"no result for message {message_id} of site {site!r}")
        return result.to_json()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    def readyz() -> JSONResponse:
        status = worker.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if sync is not None:
        sync.mount(app)
    return app


def create_serving_app(
    provider: Any,
    *,
    worker: CloudWorker | None,
    metrics: Any,
    auth: Any,
    insecure_no_auth: bool,
    max_request_bytes: int,
    cors_origins: tuple[str, ...],
    sync: CloudSync | None = None,
) -> FastAPI:
    """The Open Inference Protocol API over ``provider`` (a model repository), plus the
    worker's routes when it ingests MQTT: ``/v1/results``, ``/healthz``, ``/readyz`` and
    ``/metrics``. Results and metrics need the ``read`` scope like the rest of the API;
    ``/healthz`` and ``/readyz`` stay open as the ``/v2/health`` endpoints do."""
    from fastapi import Depends
    from fastapi.routing import APIRoute

    from fogline.cloud_service._auth import Scope
    from fogline.cloud_service._oip_app import create_inference_app

    app = create_inference_app(
        provider,
        auth=auth,
        insecure_no_auth=insecure_no_auth,
        max_request_bytes=max_request_bytes,
        cors_origins=cors_origins,
        registry=metrics.registry,
    )
    _supervise_http(app, worker.supervisor if worker is not None else provider.supervisor)
    if sync is not None:
        sync.mount(app)  # open routes (see the module docstring)
    read = [Depends(app.state.require_scope(Scope.READ))]
    admin = [Depends(app.state.require_scope(Scope.ADMIN))]

    # Triton's model repository extension: the index, and loading or unloading a model at
    # run time (admin scope). Loading blocks until the model is warm, so it runs in a
    # worker thread; other models keep serving meanwhile.
    @app.post("/v2/repository/index", dependencies=read, include_in_schema=False)
    def repository_index() -> list[dict[str, str]]:
        return [
            {"name": row.model, "version": row.version, "state": row.state, "reason": row.reason}
            for row in provider.index()
        ]

    @app.post("/v2/repository/models/{model}/load", dependencies=admin, include_in_schema=False)
    def repository_load(model: str, version: str | None = None) -> JSONResponse:
        return _admin_call(provider.load, model, version)

    @app.post("/v2/repository/models/{model}/unload", dependencies=admin, include_in_schema=False)
    def repository_unload(model: str, version: str | None = None) -> JSONResponse:
        return _admin_call(provider.unload, model, version)

    @app.get("/metrics", dependencies=read, include_in_schema=False)
    def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if worker is None:

        @app.get("/healthz", include_in_schema=False)
        def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/readyz", include_in_schema=False)
        def readyz() -> JSONResponse:
            ready = bool(provider.ready)
            failed = provider.failed
            body = {"ready": ready, "failed": None if failed is None else failed.message}
            return JSONResponse(body, status_code=200 if ready else 503)

        return app
    for route in create_app(worker).router.routes:
        if not isinstance(route, APIRoute) or route.path == "/metrics":
            continue
        open_route = route.path in ("/healthz", "/readyz")
        app.router.add_api_route(
            route.path,
            route.endpoint,
            methods=sorted(route.methods or ()),
            dependencies=None if open_route else read,
            response_model=None,
            include_in_schema=False,
        )
    return app


def _admin_call(fn: Any, model: str, version: str | None) -> JSONResponse:
    from fogline.cloud_service.errors import (
        CloudDataError,
        CloudServiceError,
        UnknownModelError,
    )

    try:
        fn(model, version)
    except UnknownModelError as exc:
        return _error(404, str(exc))
    except CloudDataError as exc:
        return _error(400, str(exc))
    except CloudServiceError as exc:
        return _error(503, str(exc))
    return JSONResponse({})
