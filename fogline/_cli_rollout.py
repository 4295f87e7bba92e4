"""``fogline rollout …`` and ``fogline fleet …``: roll a released bundle out to a fleet in
waves, and the sites the rollout service knows (docs/sync.md, "Rollouts")."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fogline._cli import fail
from fogline._cli_sync import (
    HomeOption,
    JsonOption,
    KeysOption,
    _errors_to_exit,
    _home,
    _print_json,
    _split_id,
)

if TYPE_CHECKING:
    from fogline.sync._rollout_service import RolloutService

__all__ = ["fleet_app", "parse_duration", "parse_percent", "rollout_app"]

rollout_app = typer.Typer(no_args_is_help=True)
fleet_app = typer.Typer(no_args_is_help=True)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_percent(value: str, option: str) -> float:
    """``5%`` (or a fraction, ``0.05``) as a fraction in [0, 1]."""
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{option}: {value!r} is not a percentage such as 5%") from None
    if not math.isfinite(number) or not 0 <= number <= 1:
        raise ValueError(f"{option}: {value!r} must lie between 0% and 100%")
    return number


def parse_duration(value: str, option: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` (or plain seconds) in seconds."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{option}: {value!r} is not a duration such as 30s, 10m or 2h")
    return float(match.group(1)) * _UNITS[match.group(2)]


StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Fleet store URL: sqlite:///FILE or postgresql+psycopg://… (default: "
        "fleet.db in the sync home).",
        show_default=False,
    ),
]
FleetOption = Annotated[
    str | None,
    typer.Option(
        "--fleet", help="The fleet's rollout (default: the running one).", show_default=False
    ),
]


@contextlib.contextmanager
def _service(store: str | None, home: Path | None, keys: Path | None) -> Iterator[RolloutService]:
    from fogline.sync import RolloutError

    with _errors_to_exit():
        try:
            from fogline.sync._fleet import FleetStore
            from fogline.sync._rollout_service import RolloutService

            sync_home = _home(home, keys)
            url = store or f"sqlite:///{sync_home.path / 'fleet.db'}"
            if store is None:
                sync_home.path.mkdir(parents=True, exist_ok=True)
            fleet = FleetStore(url)
            try:
                yield RolloutService(fleet, sync_home)
            finally:
                fleet.close()
        except RolloutError as exc:
            fail(str(exc))


def _figure(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_status(status: dict[str, Any]) -> None:
    console = Console()
    line = (
        f"rollout {escape(status['id'])}: {escape(status['bundle'])} to fleet "
        f"{escape(status['fleet'])}, {status['state'].replace('_', ' ')}, wave "
        f"{status['wave'] + 1} of {len(status['waves'])}; {status['failed']} of "
        f"{status['assigned']} assigned sites failed"
    )
    console.print(line)
    if status.get("reason"):
        console.print(f"reason: {escape(status['reason'])}")
    table = Table(title_justify="left")
    columns = (
        "wave", "sites", "pending", "downloading", "verified", "active", "failed",
        "rolled back", "error rate", "p50 ms", "p99 ms", "agreement",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in status["wave_table"]:
        health = row["health"]
        table.add_row(
            str(row["wave"] + 1),
            str(row["sites"]),
            str(row["pending"]),
            str(row["downloading"]),
            str(row["verified"]),
            str(row["active"]),
            str(row["failed"]),
            str(row["rolled_back"]),
            _figure(health.get("error_rate"), ".2%"),
            _figure(health.get("latency_p50_ms"), ".1f"),
            _figure(health.get("latency_p99_ms"), ".1f"),
            _figure(health.get("agreement_rate"), ".2%"),
        )
    base = status.get("baseline") or {}
    console.print(table)
    p50 = _figure(base.get("latency_p50_ms"), ".1f")
    p99 = _figure(base.get("latency_p99_ms"), ".1f")
    console.print(
        f"baseline (previous bundle): error rate {_figure(base.get('error_rate'), '.2%')}, "
        f"p50 {p50} ms, p99 {p99} ms, agreement {_figure(base.get('agreement_rate'), '.2%')}"
    )


def _emit(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(status)
    else:
        _print_status(status)


# --------------------------------------------------------------------------- rollout


@rollout_app.command("start", short_help="Roll a released bundle out to a fleet.")
def rollout_start(
    bundle: Annotated[str, typer.Argument(help="NAME:VERSION", show_default=False)],
    fleet: Annotated[
        str, typer.Option("--fleet", help="The fleet to roll out to.", show_default=False)
    ],
    canary: Annotated[
        str, typer.Option(help="The first wave's share of the fleet (0% for none).")
    ] = "5%",
    waves: Annotated[
        str, typer.Option(help="Cumulative shares of the waves after the canary, the last 100%.")
    ] = "5%,25%,100%",
    bake: Annotated[
        str, typer.Option(help="How long a wave stays healthy before the next.")
    ] = "10m",
    max_failure_rate: Annotated[
        str, typer.Option(help="Share of assigned sites that may fail before it stops.")
    ] = "2%",
    min_sites: Annotated[int, typer.Option(help="The fewest sites in a wave.")] = 1,
    site_timeout: Annotated[
        str, typer.Option(help="A site not active or silent this long has failed.")
    ] = "30m",
    auto_rollback: Annotated[
        bool, typer.Option("--auto-rollback", help="Roll back instead of pausing on failure.")
    ] = False,
    store: StoreOption = None,
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Roll a released bundle out to a fleet: the canary at once, then each wave once the
    previous one runs it, healthy, for the bake time."""
    with _service(store, home, keys) as service:
        from fogline.sync._rollout import RolloutPolicy

        name, version = _split_id(bundle)
        policy = RolloutPolicy(
            canary=parse_percent(canary, "--canary"),
            waves=tuple(parse_percent(w, "--waves") for w in waves.split(",") if w.strip()),
            bake_s=parse_duration(bake, "--bake"),
            max_failure_rate=parse_percent(max_failure_rate, "--max-failure-rate"),
            min_sites=min_sites,
            site_timeout_s=parse_duration(site_timeout, "--site-timeout"),
            auto_rollback=auto_rollback,
        )
        status = service.start(f"{name}@{version}", fleet, policy)
    _emit(status, as_json)


@rollout_app.command("status", short_help="Where a rollout stands, wave by wave.")
def rollout_status(
    fleet: FleetOption = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Print it again until it finishes.")
    ] = False,
    interval: Annotated[str, typer.Option(help="How often --watch prints.")] = "5s",
    store: StoreOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Where the fleet's rollout stands: per wave, its sites by state and the health
    figures the gate compares with the previous bundle's."""
    every = 0.0
    with _errors_to_exit():
        every = parse_duration(interval, "--interval")
    with _service(store, home, None) as service:
        while True:
            status = service.status(fleet=fleet)
            _emit(status, as_json)
            if not watch or status["state"] not in ("running", "paused"):
                break
            time.sleep(max(every, 0.1))


def _operator(verb: str, doc: str) -> None:
    def command(
        fleet: FleetOption = None,
        store: StoreOption = None,
        home: HomeOption = None,
        keys: KeysOption = None,
        as_json: JsonOption = False,
    ) -> None:
        with _service(store, home, keys) as service:
            status = getattr(service, verb)(fleet=fleet)
        _emit(status, as_json)

    command.__doc__ = doc
    rollout_app.command(verb, short_help=doc.split(".", maxsplit=1)[0] + ".")(command)


_operator("pause", "Pause the rollout: no new wave starts. Sites keep what they were told.")
_operator("resume", "Resume a paused rollout. The sites failed so far no longer count.")
_operator(
    "abort",
    "Abort the rollout. Sites not yet running the new bundle are pointed back at their "
    "previous one.",
)


@rollout_app.command("rollback", short_help="Point every site of the rollout back.")
def rollout_rollback(
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="Version to go to (default: each site's previous).", show_default=False
        ),
    ] = None,
    fleet: FleetOption = None,
    store: StoreOption = None,
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point every site of the rollout back at the bundle it ran before, or at version
    --to of the same bundle name."""
    with _service(store, home, keys) as service:
        status = service.rollback(fleet=fleet, to=to)
    _emit(status, as_json)


@rollout_app.command("tick", short_help="Take one step of every running rollout.")
def rollout_tick(
    store: StoreOption = None,
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take one step of every running rollout (from cron, or where no server ticks)."""
    with _service(store, home, keys) as service:
        stepped = service.tick()
    if as_json:
        _print_json({"rollouts": stepped})
        return
    if not stepped:
        Console().print("no running rollout")
    for status in stepped:
        _print_status(status)


# ----------------------------------------------------------------------------- fleet


def _read_key(value: str) -> dict[str, Any]:
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise ValueError(f"--key: cannot read {value}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            "--key: not JSON (a site's public key, as agent enroll --json prints)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("public_key"), dict):
        data = data["public_key"]  # site.json, or agent enroll --json
    if not isinstance(data, dict):
        raise TypeError("--key: not a public key object")
    from fogline.sync._rollout_service import public_key_dict

    try:
        return public_key_dict(data)
    except ValueError as exc:
        raise ValueError(f"--key: {exc}") from None


@fleet_app.command("add", short_help="Register a site with its public key.")
def fleet_add(
    site: Annotated[str, typer.Argument(help="Site name.", show_default=False)],
    region: Annotated[str, typer.Option("--region", help="The site's region.", show_default=False)],
    fleet: Annotated[
        str, typer.Option("--fleet", help="The fleet it belongs to.", show_default=False)
    ],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            help="Its public key: a file (site.json, agent enroll --json output) or JSON.",
            show_default=False,
        ),
    ],
    store: StoreOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a site, with the public key its status reports are verified with. Again
    with the same key it changes region and fleet; another key is refused."""
    with _service(store, home, None) as service:
        public = _read_key(key)
        new = service.register_site(site, region, fleet, public)
    data = {"site": site, "region": region, "fleet": fleet, "keyid": public["keyid"], "new": new}
    if as_json:
        _print_json(data)
    else:
        Console().print(
            f"site {escape(site)} {'registered' if new else 'updated'} in fleet {escape(fleet)} "
            f"({escape(region)}); key {str(public['keyid'])[:16]}…"
        )


def _age(seen: float | None, now: float) -> str:
    if seen is None:
        return "never"
    age = max(0.0, now - seen)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.0f}{unit} ago"
    return f"{age:.0f}s ago"


@fleet_app.command("ls", short_help="List every site: bundle, health, freshness.")
def fleet_ls(
    fleet: Annotated[
        str | None, typer.Option("--fleet", help="Only this fleet.", show_default=False)
    ] = None,
    store: StoreOption = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every site: region, fleet, the bundle it runs and the one it is told to, when
    it last reported, its health and whether its signed metadata is fresh."""
    with _service(store, home, None) as service:
        sites = service.sites(fleet)
    if as_json:
        _print_json({"sites": [s.to_dict() for s in sites]})
        return
    now = time.time()
    table = Table(title="sites", title_justify="left")
    for column in (
        "site",
        "region",
        "fleet",
        "running",
        "desired",
        "phase",
        "last seen",
        "health",
        "metadata",
    ):
        table.add_column(column, overflow="fold")
    for s in sites:
        health = ", ".join(f"{k} {v:g}" for k, v in sorted(s.health.items()))
        table.add_row(
            escape(s.site),
            escape(s.region),
            escape(s.fleet),
            escape(s.bundle or "-"),
            escape(s.desired or "-"),
            escape(s.phase) + (f": {escape(s.error)}" if s.error else ""),
            _age(s.last_seen, now),
            escape(health or "-"),
            "-" if s.last_seen is None else ("stale" if s.stale else "fresh"),
        )
    Console().print(table)
