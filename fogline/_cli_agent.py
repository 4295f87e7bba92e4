"""``fogline agent …``: run the edge agent as a service.

Heavy imports (onnxruntime, FastAPI, uvicorn) happen inside the command so that
``fogline --help`` stays fast.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fogline._cli import (
    SOFTWARE_ERROR,
    bind_http,
    broker_url_option,
    fail,
    settle_heap,
    setup_logging,
)
from fogline.reference import BUNDLE_DIR

if TYPE_CHECKING:
    import uvicorn

    from fogline.edge_agent import AgentConfig
    from fogline.edge_agent._agent import Delivery
    from fogline.messaging import ThreadFailure

__all__ = ["app", "sample_body", "with_reference_bundle"]

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

SAMPLE_TAG = "sample-{seed}"
"""The ``tag`` of a sample body: the agent returns it with the answer."""

_LOG_LEVELS = ("debug", "info", "warning", "error")


@app.callback()
def _agent() -> None:
    """Run the edge agent; make sample inputs for it."""


def _site_option(value: str | None) -> str | None:
    """A ``--site`` that cannot name an MQTT topic level is a usage error naming the option."""
    if value is not None:
        from fogline.edge_agent import AgentConfig
        from fogline.edge_agent.errors import ConfigError

        try:
            AgentConfig(site=value)  # checked as a config file's site would be
        except ConfigError as exc:
            raise typer.BadParameter(exc.problem) from None
    return value


@app.command("run", short_help="Run the agent and its local HTTP API.")
def run(
    *,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="agent.toml (see docs/agent.md)."),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            callback=broker_url_option,
            help="Broker URL, e.g. mqtt://host:1883 (overrides the file).",
        ),
    ] = None,
    site: Annotated[
        str | None, typer.Option(callback=_site_option, help="Site name (overrides the file).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle directory (overrides the file).", file_okay=False),
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="HTTP API port (overrides the file).")
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error.", case_sensitive=False)
    ] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json: one object a line.")] = "text",
) -> None:
    """Run the agent and its local HTTP API until SIGTERM or Ctrl+C, then shut down cleanly.

    Exits 70 with an error: line when a thread of the agent or the HTTP server failed
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


def sample_body(
    *, seed: int, digit: bool = True, lists: bool = False
) -> tuple[dict[str, Any], int]:
    """A body for the agent's ``POST /v1/infer`` holding one reference frame, and the digit
    in it (:data:`~fogline.reference._frames.NO_DIGIT` for a frame without one).

    The frame is one of the camera-like frames the packaged reference bundle is built and
    measured on (``fogline.reference``), drawn from the held-out digits: no download, the
    same frame for the same ``seed``. It is base64 of the raw uint8 pixels with their shape,
    or nested lists (``lists``).
    """
    from fogline.reference._frames import make_frames

    frames, labels = make_frames(1, seed=seed, p_digit=1.0 if digit else 0.0, split="holdout")
    frame = frames[0]
    body: dict[str, Any]
    if lists:
        body = {"data": frame.tolist()}
    else:
        body = {
            "b64": base64.b64encode(frame.tobytes()).decode("ascii"),
            "shape": list(frame.shape),
            "dtype": str(frame.dtype),
        }
    body["tag"] = SAMPLE_TAG.format(seed=seed)
    return body, int(labels[0])


@app.command("sample", short_help="A sample input frame for the agent's HTTP API.")
def sample(
    *,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="<file>",
            dir_okay=False,
            help="Write the body to this file instead of stdout.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Which frame: the same seed gives the same frame.")
    ] = 0,
    empty: Annotated[
        bool,
        typer.Option(
            "--empty", help="A frame with no digit in it (the agent drops it at the edge)."
        ),
    ] = False,
    lists: Annotated[
        bool,
        typer.Option("--lists", help="The pixels as nested lists instead of base64."),
    ] = False,
) -> None:
    """Write a JSON body for the agent's POST /v1/infer: one frame for the reference bundle.

    The frame is a 64×64 uint8 camera-like frame of the kind the packaged reference bundle
    reads (what fogline agent run serves when no bundle is configured), holding a
    handwritten digit unless --empty is given. Nothing is downloaded; the same --seed gives
    the same frame. The body carries the tag sample-SEED, which the answer repeats. Send
    it with: fogline agent sample | curl -s --data-binary @- http://127.0.0.1:8081/v1/infer
    """
    body, digit = sample_body(seed=seed, digit=not empty, lists=lists)
    text = json.dumps(body, separators=(",", ":"))
    what = "no digit" if empty else f"the digit {digit}"
    if out is None:
        print(text)
        print(f"a frame holding {what} (seed {seed})", file=sys.stderr)
        return
    try:
        out.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", code=1)
    print(f"wrote {out}: a frame holding {what} (seed {seed})", file=sys.stderr)


def _sync_config(config: Path | None, state_dir: Path | None, url: str | None) -> Any:
    """The ``[sync]`` section of ``--config``, with ``--state-dir``/``--url`` over it."""
    from fogline.edge_agent._config import SyncConfig, load_config
    from fogline.edge_agent.errors import AgentDataError

    try:
        sync = None
        if config is not None:
            sync = load_config(config).sync
        if state_dir is not None or url is not None:
            if sync is None and (state_dir is None or url is None):
                fail("give --config agent.toml with a [sync] section, or --state-dir and --url")
            base = sync or SyncConfig(state_dir=state_dir or Path(), url=url or "http://x")
            sync = SyncConfig(
                state_dir=state_dir or base.state_dir,
                url=url or base.url,
                poll_s=base.poll_s,
                report_s=base.report_s,
            )
    except AgentDataError as exc:
        fail(str(exc))
    if sync is None:
        fail("the agent config has no [sync] section: give one, or --state-dir and --url")
    return sync


#: Exit codes of ``fogline agent update`` (docs/agent.md, "Updates").
UPDATE_EXIT = {"idle": 0, "active": 0, "installed": 0, "transport": 1, "refused": 3, "expired": 4}


@app.command("update", short_help="Update the site's bundle once, now, in the foreground.")
def update(
    *,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="agent.toml with a [sync] section.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="The site's sync state (overrides the file).")
    ] = None,
    url: Annotated[str | None, typer.Option(help="The sync URL (overrides the file).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Check the site's signed desired state and install it if it is not what the site
    runs: download, verify, load and warm up the edge model, record it as current (the one
    before it stays as previous), report to the cloud.

    Exits 0 when installed or already up to date, 1 when the repositories could not be
    reached or another updater (a running agent) holds the site's lock, 2 for a bad
    command line or config, 3 when verification refused what was offered, 4 when the
    signed metadata has expired (nothing installed)."""
    setup_logging("warning", "text")
    sync = _sync_config(config, state_dir, url)
    from fogline.edge_agent._updater import StandaloneHost, standalone_updater
    from fogline.edge_agent.errors import UpdateError
    from fogline.sync import SyncError

    try:
        with standalone_updater(sync, StandaloneHost()) as updater:
            result = updater.attempt()
            previous = _previous(sync.state_dir)
    except (UpdateError, SyncError) as exc:
        fail(str(exc), code=1)
    out = {
        "site": updater.site,
        "outcome": result.outcome,
        "running": result.running,
        "previous": previous,
        "desired": result.desired,
        "error": result.error,
    }
    if as_json:
        print(json.dumps(out))
    elif result.outcome == "installed":
        print(f"installed {result.running} (previous {previous or 'none'})")
    elif result.outcome == "active":
        print(f"up to date: {result.running}")
    elif result.outcome == "idle":
        print(f"nothing assigned to site {updater.site}; running {result.running or 'none'}")
    elif result.outcome == "aborted":
        print(f"the director changed its desired bundle meanwhile; running {result.running}")
    else:
        print(f"{result.outcome}: {result.error}", file=sys.stderr)
    raise typer.Exit(UPDATE_EXIT.get(result.outcome, 1))


def _previous(state_dir: Path) -> str | None:
    from fogline.edge_agent._installed import read_installed

    prev = read_installed(state_dir).previous
    return None if prev is None else prev.id


@app.command("status", short_help="What the site runs and where its update stands.")
def status(
    *,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="agent.toml with a [sync] section.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="The site's sync state (overrides the file).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show the site, the bundle it runs and the previous one (current.json), and the
    update's phase, desired bundle, staleness, last error and last import (update.json).
    Reads files only: works while the agent runs."""
    from fogline.edge_agent._installed import read_installed, read_status

    if state_dir is None:
        state_dir = _sync_config(config, None, None).state_dir
    site_file = state_dir / "site.json"
    try:
        site = json.loads(site_file.read_text()).get("site")
    except (OSError, ValueError, AttributeError) as exc:
        fail(f"{state_dir} is not an enrolled site: {exc}", code=1)
    installed = read_installed(state_dir)
    st = read_status(state_dir)
    out = {
        "site": site,
        "running": None if installed.current is None else installed.current.id,
        "previous": None if installed.previous is None else installed.previous.id,
        "desired": st.get("desired"),
        "phase": st.get("phase", "idle"),
        "stale": bool(st.get("stale", False)),
        "error": st.get("error"),
        "time_ms": st.get("time_ms"),
        "last_import": st.get("last_import"),
    }
    if as_json:
        print(json.dumps(out))
        return
    last = out.pop("last_import")
    for key, value in out.items():
        print(f"{key}: {'-' if value is None else value}")
    if isinstance(last, dict):
        print(f"last_import: {last.get('outcome')}: {last.get('message')} ({last.get('file')})")
    else:
        print("last_import: -")
