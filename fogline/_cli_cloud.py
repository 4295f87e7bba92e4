"""``fogline cloud …``: run the cloud worker with its HTTP API; ``doctor``, ``batch`` and
``token create``.

Heavy imports (onnxruntime, FastAPI, SQLAlchemy, uvicorn) happen inside the commands so
``fogline --help`` stays fast. The cloud package raises its own errors; this module turns
them into one ``error: …`` line and the exit code (2 for bad input, 1 for a failure, 70
when ``serve`` stopped because a thread failed for good).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
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
from fogline.cloud_service._auth import Scope, add_token, generate_token
from fogline.cloud_service._batch_job import load_inputs, save_outputs, score
from fogline.cloud_service._doctor import diagnose, gpu_usable
from fogline.cloud_service.errors import CloudDataError, CloudServiceError
from fogline.reference import BUNDLE_DIR

if TYPE_CHECKING:
    from fogline.cloud_service import CloudConfig
    from fogline.cloud_service._doctor import Finding
    from fogline.messaging import ThreadFailure

log = logging.getLogger("fogline.cloud")

__all__ = ["app", "batch_command", "doctor_command", "token_command", "with_reference_bundle"]

app = typer.Typer(no_args_is_help=True, help="Run the cloud worker and its HTTP API.")


def with_reference_bundle(config: CloudConfig) -> CloudConfig:
    """``config`` serving the packaged reference bundle when it names no bundle of its own.

    The cloud package does not know where the reference bundle lives; the command does.
    """
    return config if config.bundles else config.with_overrides(bundles=(BUNDLE_DIR,))


def _report(findings: list[Finding]) -> dict[str, Any]:
    return {
        "findings": [dataclasses.asdict(f) for f in findings],
        "gpu_usable": gpu_usable(findings),
    }


def _print_table(findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="fogline cloud doctor")
    table.add_column("check")
    table.add_column("usable")
    table.add_column("detail", overflow="fold")
    for f in findings:
        # details hold text such as fogline[gpu], which rich would read as markup
        table.add_row(
            escape(f.check), "[green]yes[/]" if f.usable else "[red]no[/]", escape(f.detail)
        )
    console = Console()
    console.print(table)
    if gpu_usable(findings):
        console.print("A GPU path is usable.")
    else:
        console.print("No GPU path is usable here: models run on the CPU with onnxruntime.")


def doctor_command(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    require_gpu: Annotated[
        bool, typer.Option("--require-gpu", help="Exit 1 when no GPU path is usable.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="cloud.toml whose backend and engine cache to check."),
    ] = None,
) -> None:
    """Show which inference backends and providers this host can use, and why not the others.

    Exits 0 whatever it finds, unless --require-gpu is given and no GPU path is usable (1).
    """
    engine_cache_dir: Path | None = None
    backend = "auto"
    device_id = 0
    if config is not None:
        from fogline.cloud_service._config import CloudConfig

        try:
            cfg = CloudConfig.from_toml(config)
        except CloudDataError as exc:
            fail(str(exc))
        engine_cache_dir = cfg.tensorrt.engine_cache_dir
        backend = cfg.backend
        device_id = int(getattr(cfg.tensorrt, "device_id", 0))
    findings = diagnose(engine_cache_dir=engine_cache_dir, backend=backend, device_id=device_id)
    if json_output:
        print(json.dumps(_report(findings)))
    else:
        _print_table(findings)
    if require_gpu and not gpu_usable(findings):
        raise typer.Exit(1)


def batch_command(
    model_repository: Annotated[
        Path, typer.Option("--model-repository", help="Model repository directory.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model to score with.")],
    input_file: Annotated[
        Path,
        typer.Option("--input", "-i", help=".npz with one array per model input, items first."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write outputs (.npz).")],
    version: Annotated[
        str | None, typer.Option("--version", help="Model version (default: the latest).")
    ] = None,
    chunk: Annotated[
        int | None,
        typer.Option("--chunk", help="Rows per request (default: the model's max_batch_size)."),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="onnxruntime intra-op threads (0: one per core).")
    ] = 0,
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, tensorrt or torch.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Score a file of inputs through a model of the repository, at low priority."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fogline.cloud_service._repository import ModelRepository

    if chunk is not None and chunk < 1:
        fail(f"--chunk must be at least 1, got {chunk}")
    if threads < 0:
        fail(f"--threads must be 0 or more, got {threads}")
    from fogline.cloud_service._config import BACKEND_KINDS

    if backend not in BACKEND_KINDS:
        fail(f"--backend {backend!r} must be one of {', '.join(BACKEND_KINDS)}")
    try:
        arrays = load_inputs(input_file)
        repository = ModelRepository(
            model_repository, models=[model], backend=backend, threads=threads
        )
    except CloudDataError as exc:
        fail(str(exc))
    console = Console(stderr=True)
    try:
        try:
            if version is None:
                repository.start()
            else:
                repository.load(model, version)
        except CloudDataError as exc:
            fail(str(exc))
        except CloudServiceError as exc:
            fail(str(exc), code=1)
        began = time.monotonic()
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("items"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, disable=not progress) as bar:
            total = max((a.shape[0] for a in arrays.values() if a.ndim), default=0)
            task = bar.add_task(f"{model}", total=total or None)
            try:
                outputs = score(
                    repository,
                    model,
                    arrays,
                    version=version,
                    chunk=chunk,
                    on_progress=lambda n: bar.advance(task, n),
                    source=str(input_file),
                )
            except CloudDataError as exc:
                fail(str(exc))
            except CloudServiceError as exc:
                fail(str(exc), code=1)
        try:
            save_outputs(output, outputs)
        except OSError as exc:
            fail(f"cannot write {output}: {exc}", code=1)
        elapsed = time.monotonic() - began
        items = next(iter(outputs.values())).shape[0] if outputs else 0
        rate = items / elapsed if elapsed > 0 else float("inf")
        typer.echo(
            f"scored {items} items with {model} in {elapsed:.2f} s ({rate:.0f} items/s) -> {output}"
        )
    finally:
        repository.stop()


app.command("doctor", short_help="Which GPU and CPU backends work here, and why.")(doctor_command)
app.command("batch", short_help="Score a file of inputs at low priority.")(batch_command)


def _store_url_option(value: str | None) -> str | None:
    """A ``--store`` that is no database URL is a usage error naming the option."""
    if value is not None:
        from fogline.cloud_service._config import StoreConfig

        try:
            StoreConfig(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc).removeprefix("url ")) from None
    return value


@app.command("serve", short_help="Run the cloud worker and its HTTP API.")
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="cloud.toml (defaults apply without one)."),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            callback=broker_url_option,
            help="Broker URL, e.g. mqtt://host:1883 (overrides config).",
        ),
    ] = None,
    bundle: Annotated[
        list[Path] | None,
        typer.Option(
            "--bundle", metavar="<path>", help="Bundle directory to serve; repeat for several."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP listen address.")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="HTTP port.")] = None,
    store: Annotated[
        str | None,
        typer.Option(
            callback=_store_url_option, help="Result store URL, e.g. sqlite:///results.db."
        ),
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
        list[str] | None,
        typer.Option(metavar="<origin>", help="Allow CORS from this origin; repeat for several."),
    ] = None,
    sync_home: Annotated[
        Path | None,
        typer.Option(
            "--sync-home",
            file_okay=False,
            help="Serve signed model sync from this sync home (fogline keys init): its "
            "repositories, status reports, the rollout tick and the MQTT nudges.",
        ),
    ] = None,
    sync_store: Annotated[
        str | None,
        typer.Option(
            "--sync-store",
            help="Fleet store URL (default: sqlite:///<sync home>/fleet.db, as fogline "
            "rollout uses).",
        ),
    ] = None,
    sync_tick_s: Annotated[
        float | None,
        typer.Option("--sync-tick-s", help="Seconds between rollout ticks (default 5)."),
    ] = None,
) -> None:
    """Consume features over MQTT, answer each site, store results, serve the HTTP API.

    With --model-repository, also serve the Open Inference Protocol (KServe V2) API over
    the repository's models and the bundles' cloud parts; the MQTT ingest then runs only
    when a broker is configured (--broker or [broker] in the config file).
    SIGTERM or Ctrl-C answers what is queued, then exits 0. A thread of the worker or of
    the model repository that failed for good (docs/cloud.md, "Thread supervision"), or the
    HTTP server's own loop failing, stops the service with an error: line and exit 70.

    With --sync-home (or [sync] in the config file), also serve the sync home's two
    repositories under /sync/, the nonce and report routes under /v1/sync/, step running
    rollouts every --sync-tick-s, and nudge each site whose desired bundle changed over
    MQTT (docs/cloud.md, "Sync").
    """
    from fogline.cloud_service._config import CloudConfig

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
            sync_home=sync_home,
            sync_store=sync_store,
            sync_tick_s=sync_tick_s,
        )
        cfg = with_reference_bundle(cfg)
        env_keys = os.environ.get("FOGLINE_SYNC_KEYS")
        if cfg.sync is not None and cfg.sync.keys is None and env_keys:
            # as the sync commands do: the director's online keys kept apart from the home
            cfg = dataclasses.replace(cfg, sync=dataclasses.replace(cfg.sync, keys=Path(env_keys)))
    except CloudDataError as exc:
        fail(str(exc))
    setup_logging(level, log_format)

    import uvicorn

    from fogline.cloud_service._app import create_app, create_serving_app
    from fogline.cloud_service._metrics import CloudMetrics
    from fogline.cloud_service._sync import CloudSync
    from fogline.cloud_service._worker import CloudWorker

    sock = bind_http(cfg.http.host, cfg.http.port)
    servers: list[uvicorn.Server] = []

    def _on_failure(failure: ThreadFailure) -> None:
        # On the failing thread: end the server; the command exits 70 once it stops.
        for running in servers:
            running.should_exit = True

    metrics = CloudMetrics()
    with_mqtt = model_repository is None or broker is not None or _has_broker(config)
    worker: CloudWorker | None = None
    repo = None
    result_store = None
    cloud_sync: CloudSync | None = None
    try:
        if cfg.sync is not None:
            # Before any model loads: a home or store that cannot work is said at once.
            cloud_sync = CloudSync(cfg.sync, cfg.topics)
            metrics.thread_failures.add(cloud_sync.supervisor.counts)
        if with_mqtt:
            from fogline.cloud_service._store import ResultStore

            # The store first: a store URL that cannot work is a one-line error, said
            # before any model is loaded and warmed.
            result_store = ResultStore(cfg.store.url)
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
            repo.supervisor.on_fatal(_on_failure)
        if with_mqtt:
            # With a repository, edge features share each model's scheduler with the API
            # (the stream lane); without, the worker builds its own over the bundles.
            on_demand: dict[str, Any] = {}
            if cloud_sync is not None:
                from fogline.cloud_service import (
                    CatalogueSource,
                    director_wanted,
                    fleet_wanted,
                    union_wanted,
                )

                # Every released version a site runs or is told to run: loaded from the
                # catalogue (verified) before its first message, unloaded once idle.
                on_demand = {
                    "bundle_source": CatalogueSource(
                        cloud_sync.home.repository_dir("catalogue"),
                        cloud_sync.home.path / "cloud-bundles",
                    ),
                    "wanted": union_wanted(
                        director_wanted(cloud_sync.home.path), fleet_wanted(cloud_sync.store)
                    ),
                }
            worker = CloudWorker(
                cfg,
                metrics=metrics,
                repository=repo,
                store=result_store,
                on_failure=_on_failure,
                **on_demand,
            )
            # Connect in the background: /readyz answers 503 until the broker is reached.
            worker.start(wait=False)
        if cloud_sync is not None:
            if worker is not None:
                running_worker = worker
                cloud_sync.start(connection=lambda: running_worker.mqtt)
            else:
                log.info("no broker configured: sites learn of sync changes at their next poll")
                cloud_sync.start()
    except CloudDataError as exc:
        if cloud_sync is not None:
            cloud_sync.stop()
        fail(str(exc))
    except CloudServiceError as exc:
        if cloud_sync is not None:
            cloud_sync.stop()
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
            sync=cloud_sync,
        )
    else:
        assert worker is not None
        http_app = create_app(worker, sync=cloud_sync)

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
    servers.append(server)
    failure_line: str | None = None

    def _failure() -> ThreadFailure | None:
        if worker is not None and worker.failed is not None:
            return worker.failed
        return None if repo is None else repo.failed

    if _failure() is not None:  # failed before the server was there to end
        server.should_exit = True
    try:
        server.run(sockets=[sock])
    except Exception as exc:  # the HTTP server's own loop: the API is gone
        log.critical("the HTTP server failed", exc_info=True)
        failure_line = f"the HTTP server failed: {type(exc).__name__}: {exc}"
    finally:
        if cloud_sync is not None:
            cloud_sync.stop()  # first: its nudges go out on the worker's connection
        if worker is not None:
            worker.stop()
        if repo is not None:
            repo.stop()
        if result_store is not None:
            result_store.close()  # the worker leaves a store it was given open
    failed = _failure()
    if failure_line is None and failed is not None:
        failure_line = failed.message
    if failure_line is not None:
        fail(failure_line, code=SOFTWARE_ERROR)


def _has_broker(config: Path | None) -> bool:
    if config is None:
        return False
    from fogline.messaging import load_toml

    try:
        return "broker" in load_toml(config)
    except Exception:  # noqa: BLE001 - already parsed once above; unreadable means no
        return False


def token_command(
    name: Annotated[
        str, typer.Option("--name", help="Who the token is for (letters, digits, . _ -).")
    ],
    scope: Annotated[
        list[Scope],
        typer.Option(
            "--scope", metavar="<infer|read|admin>", help="What it may do; repeat for several."
        ),
    ],
    file: Annotated[
        Path, typer.Option("--file", help="Token file to add the hash to (TOML, or .json).")
    ] = Path("tokens.toml"),
) -> None:
    """Mint an API token: print it once, store only its SHA-256 in the token file (0600).

    The token cannot be recovered later; mint a new one if it is lost.
    """
    try:
        secret, entry = generate_token(name, scope)
        add_token(file, entry)
    except (ValueError, OSError) as exc:
        # ConfigError is a ValueError; neither message ever contains the secret.
        fail(str(exc))
    print(secret)
    print(
        f"token {entry.name!r} ({', '.join(sorted(entry.scopes))}) added to {file}; "
        f"this is the only time it is shown",
        file=sys.stderr,
    )


tokens_app = typer.Typer(no_args_is_help=True, help="API tokens for the inference API.")
tokens_app.command("create", short_help="Mint an API token; only its hash is stored.")(
    token_command
)
app.add_typer(tokens_app, name="token")
