"""``fogline agent …``: run the edge agent as a service.

Heavy imports (onnxruntime, FastAPI, uvicorn) happen inside the command so that
``fogline --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from fogline._cli import SOFTWARE_ERROR, bind_http, fail, settle_heap, setup_logging
from fogline.reference import BUNDLE_DIR

if TYPE_CHECKING:
    import uvicorn

    from fogline.edge_agent import AgentConfig
    from fogline.edge_agent._agent import Delivery
    from fogline.messaging import ThreadFailure

__all__ = ["app", "with_reference_bundle"]

log = logging.getLogger("fogline.edge_agent")


def _log_delivery(d: Delivery) -> None:
    """Under the daemon, late outcomes (the cloud's answer after a degraded or timed-out
    one, items recovered from the outbox) are logged; the cloud's result store keeps the
    answers too, under the message id the caller got."""
    if d.answer is not None:
        log.info(
            "late cloud answer for %s (tag %s): label %s, confidence %s%s",
            d.message_id,
            d.tag,
            d.answer.label,
            d.answer.confidence,
            " (recovered from the outbox)" if d.recovered else "",
        )
    else:
        log.warning(
            "item %s (tag %s) ended without a cloud answer: %s", d.message_id, d.tag, d.error
        )


def with_reference_bundle(config: AgentConfig) -> AgentConfig:
    """``config`` on the packaged reference bundle when it names no bundle of its own.

    The agent package does not know where the reference bundle lives; the command does.
    """
    return config if config.bundle_dir is not None else config.replace(bundle_dir=BUNDLE_DIR)


app = typer.Typer(no_args_is_help=True)

_LOG_LEVELS = ("debug", "info", "warning", "error")


@app.callback()
def _agent() -> None:
    """Run the edge agent."""


@app.command("run")
def run(
    *,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="agent.toml (see docs/agent.md)", dir_okay=False),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="broker URL, e.g. mqtt://host:1883 (overrides the file)")
    ] = None,
    site: Annotated[str | None, typer.Option(help="site name (overrides the file)")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="bundle directory (overrides the file)", file_okay=False)
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP API port (overrides the file)")] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error", case_sensitive=False)
    ] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json: one object a line")] = "text",
) -> None:
    """Run the agent and its local HTTP API until SIGTERM or Ctrl+C, then shut down cleanly.

    Exits 70 with an ``error:`` line when a thread of the agent or the HTTP server failed
    for good (see docs/agent.md, "Thread supervision")."""
    level = log_level.lower()
    if level not in _LOG_LEVELS:
        fail(f"--log-level {log_level!r} must be one of {', '.join(_LOG_LEVELS)}")
    setup_logging(level, log_format)
    from fogline.edge_agent._config import load_config
    from fogline.edge_agent.errors import AgentDataError, AgentError

    if config is None and site is None:
        fail("give --config agent.toml or at least --site")
    overrides = {"site": site, "broker.url": broker, "bundle_dir": bundle, "http.port": port}
    try:
        cfg = with_reference_bundle(load_config(config, overrides))
    except AgentDataError as exc:
        fail(str(exc))

    # Until uvicorn takes over the signals (and after it hands them back: it re-raises
    # the one it caught once it has shut down), a signal only asks for a clean stop.
    stop_requested: list[int] = []

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        import uvicorn

        from fogline.edge_agent._agent import Agent
        from fogline.edge_agent._api import create_app

        sock = bind_http(cfg.http.host, cfg.http.port)
        servers: list[uvicorn.Server] = []

        def _on_failure(failure: ThreadFailure) -> None:
            # On the failing thread: end the server; the command exits 70 once it stops.
            for server in servers:
                server.should_exit = True

        failure_line: str | None = None
        try:
            agent = Agent(cfg, on_answer=_log_delivery, on_failure=_on_failure)
            agent.start(wait_connected=False)
        except AgentDataError as exc:
            fail(str(exc))
        except AgentError as exc:
            fail(str(exc), code=1)
        settle_heap()
        try:
            if stop_requested:
                return
            server = uvicorn.Server(
                uvicorn.Config(
                    create_app(agent),
                    host=cfg.http.host,
                    port=cfg.http.port,
                    log_level=level,
                    log_config=None,
                    access_log=level == "debug",
                )
            )
            log.info(
                "site %s: HTTP API on http://%s:%d, broker %s:%d",
                cfg.site,
                cfg.http.host,
                cfg.http.port,
                cfg.broker.host,
                cfg.broker.port,
            )
            servers.append(server)
            if agent.failed is not None:  # failed before the server was there to end
                server.should_exit = True
            try:
                server.run(sockets=[sock])
            except SystemExit:
                fail(f"the HTTP API could not listen on {cfg.http.host}:{cfg.http.port}", code=1)
            except Exception as exc:  # the HTTP server's own loop: the API is gone
                log.critical("site %s: the HTTP server failed", cfg.site, exc_info=True)
                failure_line = f"the HTTP server failed: {type(exc).__name__}: {exc}"
        finally:
            agent.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure_line is None and agent.failed is not None:
        failure_line = agent.failed.message
    if failure_line is not None:
        fail(failure_line, code=SOFTWARE_ERROR)
