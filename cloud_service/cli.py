"""``fogline cloud …``: run the cloud worker with its HTTP API.

Heavy imports (onnxruntime, FastAPI, SQLAlchemy, uvicorn) happen inside the command so
``fogline --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from fogline._cli import fail, settle_heap, setup_logging
from fogline.cloud_service._auth import token_command
from fogline.cloud_service._batch_job import batch_command
from fogline.cloud_service._doctor import doctor_command

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, help="Run the cloud worker and its HTTP API.")
app.command("doctor")(doctor_command)
app.command("batch")(batch_command)


@app.command("serve")
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="cloud.toml (defaults apply without one)."),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="Broker URL, e.g. mqtt://host:1883 (overrides config).")
    ] = None,
    bundle: Annotated[
        list[Path] | None,
        typer.Option("--bundle", help="Bundle directory to serve; repeat for several."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    store: Annotated[
        str | None, typer.Option(help="Result store URL, e.g. sqlite:///results.db.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json: one object a line.")] = "text",
    model_repository: Annotated[
        Path | None,
        typer.Option(
            "--model-repository",
            help="Serve the Open Inference Protocol API over this Triton-layout directory "
            "(and the bundles' cloud parts).",
        ),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(help="Token file (fogline cloud token create) for the inference API."),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Open the inference API to anyone.")
    ] = False,
    max_request_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest accepted inference request body.")
    ] = 64.0,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Allow CORS from this origin; repeat for several.")
    ] = None,
) -> None:
    """Consume features over MQTT, answer each site, store results, serve the HTTP API.

    With --model-repository, also serve the Open Inference Protocol (KServe V2) API over
    the repository's models and the bundles' cloud parts; the MQTT ingest then runs only
    when a broker is configured (--broker or [broker] in the config file).
    SIGTERM or Ctrl-C answers what is queued, then exits 0.
    """
    from fogline.cloud_service._config import CloudConfig
    from fogline.cloud_service.errors import CloudDataError, CloudServiceError

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        fail(f"--log-level {log_level!r} must be debug, info, warning or error")
    try:
        cfg = CloudConfig.from_toml(config) if config is not None else CloudConfig()
        cfg = cfg.with_overrides(
            broker_url=broker,
            bundles=tuple(bundle) if bundle else None,
            http_host=host,
            http_port=port,
            store_url=store,
        )
    except CloudDataError as exc:
        fail(str(exc))
    setup_logging(level, log_format)

    import uvicorn

    from fogline.cloud_service._app import create_app, create_serving_app
    from fogline.cloud_service._metrics import CloudMetrics
    from fogline.cloud_service._worker import CloudWorker

    metrics = CloudMetrics()
    with_mqtt = model_repository is None or broker is not None or _has_broker(config)
    worker: CloudWorker | None = None
    repo = None
    try:
        if model_repository is not None:
            from fogline.cloud_service._auth import load_token_store
            from fogline.cloud_service._repository import ModelRepository, bundle_model_config

            if tokens is None and not insecure_no_auth:
                fail("the inference API needs --tokens FILE (or --insecure-no-auth)")
            auth = load_token_store(tokens) if tokens is not None else None
            repo = ModelRepository(
                model_repository,
                bundles=cfg.bundles,
                backend=cfg.backend,
                threads=cfg.threads,
                tensorrt=cfg.tensorrt,
                bundle_config=bundle_model_config(cfg.batching),
                metrics=metrics,
            )
            repo.start()
        if with_mqtt:
            # With a repository, edge features share each model's scheduler with the API
            # (the stream lane); without, the worker builds its own over the bundles.
            worker = CloudWorker(cfg, metrics=metrics, repository=repo)
            # Connect in the background: /readyz answers 503 until the broker is reached.
            worker.start(wait=False)
    except CloudDataError as exc:
        fail(str(exc))
    except CloudServiceError as exc:
        fail(str(exc), code=1)
    settle_heap()
    if repo is not None:
        http_app = create_serving_app(
            repo,
            worker=worker,
            metrics=metrics,
            auth=auth,
            insecure_no_auth=insecure_no_auth,
            max_request_bytes=int(max_request_mb * 1024 * 1024),
            cors_origins=tuple(cors_origin or ()),
        )
    else:
        assert worker is not None
        http_app = create_app(worker)

    server = uvicorn.Server(
        uvicorn.Config(
            http_app,
            host=cfg.http.host,
            port=cfg.http.port,
            log_level=log_level.lower(),
            log_config=None,  # uvicorn logs through the root handler (text or JSON)
            access_log=False,
            lifespan="off",
        )
    )

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        # uvicorn installs its own handlers while serving and re-raises the signal after
        # its graceful shutdown; this handler turns that into a normal exit.
        server.should_exit = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.run()
    finally:
        if worker is not None:
            worker.stop()
        if repo is not None:
            repo.stop()


def _has_broker(config: Path | None) -> bool:
    if config is None:
        return False
    from fogline.messaging import load_toml

    try:
        return "broker" in load_toml(config)
    except Exception:  # noqa: BLE001 - already parsed once above; unreadable means no
        return False


tokens_app = typer.Typer(no_args_is_help=True, help="API tokens for the inference API.")
tokens_app.command("create")(token_command)
app.add_typer(tokens_app, name="token")
