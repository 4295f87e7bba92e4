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

from fogline._cli import fail, settle_heap
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
) -> None:
    """Consume features over MQTT, answer each site, store results, serve the HTTP API.

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
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from fogline.cloud_service._app import create_app
    from fogline.cloud_service._worker import CloudWorker

    worker = CloudWorker(cfg)
    try:
        # Connect in the background: /readyz answers 503 until the broker is reached.
        worker.start(wait=False)
    except CloudDataError as exc:
        fail(str(exc))
    except CloudServiceError as exc:
        fail(str(exc), code=1)
    settle_heap()

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(worker),
            host=cfg.http.host,
            port=cfg.http.port,
            log_level=log_level.lower(),
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
        worker.stop()
