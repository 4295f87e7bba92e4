"""``fogline keys …``, ``fogline bundle …``, ``fogline model publish``, ``fogline agent enroll``:
the signed model sync's roots of trust, releases and site enrolment (docs/sync.md).

python-tuf and onnxruntime are imported inside the commands, so ``fogline --help`` stays
fast; without them a command names the extra to install in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fogline._cli import fail

if TYPE_CHECKING:
    from fogline.edge_agent._installed import ImportResult
    from fogline.sync import Expiry, Release, SyncHome

__all__ = ["agent_app", "bundle_app", "keys_app", "model_app"]

keys_app = typer.Typer(no_args_is_help=True)
bundle_app = typer.Typer(no_args_is_help=True)
# Merged into `fogline model` and `fogline agent` (added there without a name).
model_app = typer.Typer()
agent_app = typer.Typer()

FAILED = 1
_SYNC_MODULES = ("tuf", "securesystemslib", "cryptography", "urllib3", "onnxruntime")


def default_home() -> Path:
    """``$FOGLINE_SYNC_HOME``, else ``$XDG_DATA_HOME/fogline/sync``, else
    ``~/.local/share/fogline/sync``."""
    env = os.environ.get("FOGLINE_SYNC_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "fogline" / "sync"


def default_site_state() -> Path:
    """``$FOGLINE_STATE_DIR/sync``, else ``$XDG_STATE_HOME/fogline/sync``, else
    ``~/.local/state/fogline/sync`` (beside the agent's outbox)."""
    env = os.environ.get("FOGLINE_STATE_DIR")
    if env:
        return Path(env) / "sync"
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fogline" / "sync"


@contextlib.contextmanager
def _errors_to_exit() -> Iterator[None]:
    """Bad input and refused data → ``error: …``, exit 2; a missing key, an unusable
    directory or a failed download → exit 1; a missing module names the extra. No
    traceback, and never a key's bytes."""
    from fogline.sync import (
        FetchError,
        PublishError,
        SigningKeyError,
        StorageError,
        SyncError,
        VerificationError,
    )

    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".", maxsplit=1)[0]
        if top not in _SYNC_MODULES:
            raise
        install = "pip install 'fogline[edge]'"
        fail(f"this command needs the 'edge' extra (missing module {top}): {install}")
    except (VerificationError, PublishError) as exc:
        fail(str(exc))
    except (SigningKeyError, StorageError, FetchError) as exc:
        fail(str(exc), code=FAILED)
    except SyncError as exc:
        fail(str(exc), code=FAILED)
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), code=FAILED)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Publisher directory with both repositories (default: $FOGLINE_SYNC_HOME, "
        "else ~/.local/share/fogline/sync).",
        file_okay=False,
    ),
]
KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="Key directory (default: $FOGLINE_SYNC_KEYS, else HOME/keys).",
        file_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _home(home: Path | None, keys: Path | None) -> SyncHome:
    from fogline.sync import SyncHome

    env_keys = os.environ.get("FOGLINE_SYNC_KEYS")
    return SyncHome(
        home if home is not None else default_home(),
        keys if keys is not None else (Path(env_keys) if env_keys else None),
    )


def _parse_expiry(values: Sequence[str]) -> dict[str, Expiry]:
    """``ROLE=DAYS`` (both repositories) or ``REPOSITORY.ROLE=DAYS`` settings."""
    from fogline.sync import DEFAULT_EXPIRY, Expiry

    roles = ("root", "targets", "snapshot", "timestamp")
    chosen: dict[str, dict[str, float]] = {repo: {} for repo in DEFAULT_EXPIRY}
    for value in values:
        key, sep, days = value.partition("=")
        repo, dot, role = key.rpartition(".")
        repos = [repo] if dot else list(DEFAULT_EXPIRY)
        if not sep or role not in roles or any(r not in DEFAULT_EXPIRY for r in repos):
            raise ValueError(
                f"--expiry {value!r} must be ROLE=DAYS or REPOSITORY.ROLE=DAYS "
                "(roles: root, targets, snapshot, timestamp; repositories: catalogue, director)"
            )
        try:
            number = float(days)
        except ValueError:
            raise ValueError(f"--expiry {value!r}: {days!r} is not a number of days") from None
        for r in repos:
            chosen[r][f"{role}_days"] = number
    return {
        repo: Expiry.from_dict({**DEFAULT_EXPIRY[repo].to_dict(), **chosen[repo]})
        for repo in DEFAULT_EXPIRY
    }


# ------------------------------------------------------------------------------ keys


@keys_app.command("init", short_help="Create the roots of trust and their keys.")
def keys_init(
    home: HomeOption = None,
    keys: KeysOption = None,
    root_keys: Annotated[int, typer.Option(help="Root keys of each repository.")] = 1,
    root_threshold: Annotated[
        int, typer.Option(help="How many root keys must sign a new root.")
    ] = 1,
    expiry: Annotated[
        list[str] | None,
        typer.Option(
            "--expiry",
            help="ROLE=DAYS or REPOSITORY.ROLE=DAYS, e.g. timestamp=2 (repeat).",
            show_default=False,
        ),
    ] = None,
    site_bins_bits: Annotated[
        int, typer.Option(help="The director keeps sites in 2^N hash bins.")
    ] = 8,
    as_json: JsonOption = False,
) -> None:
    """Create the roots of trust of the catalogue and the director, and their keys."""
    with _errors_to_exit():
        from fogline.sync import SyncHome

        chosen = _parse_expiry(expiry or [])
        target = _home(home, keys)
        made = SyncHome.init(
            target.path,
            keys=target.keys.root,
            root_keys=root_keys,
            root_threshold=root_threshold,
            expiry=chosen,
            site_bins_bits=site_bins_bits,
        )
        summary = {
            "home": str(made.path),
            "keys": str(made.keys.root),
            "root_keys": root_keys,
            "root_threshold": root_threshold,
            "site_bins": 2**site_bins_bits,
            "roots": {repo: str(made.root_file(repo)) for repo in ("catalogue", "director")},
            "expiry_days": {repo: chosen[repo].to_dict() for repo in chosen},
        }
    if as_json:
        _print_json(summary)
        return
    console = Console()
    console.print(f"catalogue and director created in {escape(summary['home'])}")
    console.print(
        f"keys in {escape(summary['keys'])} (owner-only): {root_keys} root key(s) per "
        f"repository, {root_threshold} must sign a new root"
    )
    for repo, path in summary["roots"].items():
        console.print(f"provision sites with the {repo} root: {escape(path)}")


@keys_app.command("rotate", short_help="Replace a role's keys.")
def keys_rotate(
    role: Annotated[
        str, typer.Argument(help="root, targets, snapshot or timestamp.", show_default=False)
    ],
    repository: Annotated[
        str, typer.Option("--repository", "-r", help="catalogue or director.")
    ] = "catalogue",
    new_keys: Annotated[
        int | None,
        typer.Option(help="How many new keys (default: as many as the role has now)."),
    ] = None,
    threshold: Annotated[
        int | None,
        typer.Option(help="How many must sign (default: the role's threshold now)."),
    ] = None,
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace a role's keys. A new root is signed by the old root threshold and the new
    one; sites walk root versions one by one. Old key files are removed."""
    with _errors_to_exit():
        target = _home(home, keys)
        current = target.writer(repository).root().roles.get(role)
        if current is None:
            raise ValueError(f"role {role!r} must be root, targets, snapshot or timestamp")
        count = new_keys if new_keys is not None else len(current.keyids)
        needed = threshold if threshold is not None else min(current.threshold, count)
        version = target.rotate(repository, role, keys=count, threshold=needed)
    result = {
        "repository": repository,
        "role": role,
        "keys": count,
        "threshold": needed,
        "root_version": version,
    }
    if as_json:
        _print_json(result)
    else:
        Console().print(
            f"{repository} {role}: {count} new key(s), {needed} must sign; "
            f"root is now version {version}"
        )


@keys_app.command("refresh", short_help="Re-sign metadata close to expiring.")
def keys_refresh(
    home: HomeOption = None, keys: KeysOption = None, as_json: JsonOption = False
) -> None:
    """Re-sign what is within half its expiry period of expiring, with the keys present.

    Run it from a timer (the timestamps expire after a day by default). Exits 1 when a role
    is due but its key is not here (an offline key: sign with it present)."""
    with _errors_to_exit():
        reports = _home(home, keys).refresh()
    data = {
        repo: {"resigned": list(r.resigned), "due_without_key": list(r.due_without_key)}
        for repo, r in reports.items()
    }
    if as_json:
        _print_json(data)
    else:
        console = Console()
        for repo, r in data.items():
            console.print(f"{repo}: re-signed {', '.join(r['resigned']) or 'nothing'}")
            if r["due_without_key"]:
                console.print(
                    f"[yellow]{repo}: due, key not here:[/] {', '.join(r['due_without_key'])}"
                )
    if any(r["due_without_key"] for r in data.values()):
        raise typer.Exit(FAILED)


# ---------------------------------------------------------------------------- bundle


def _bundle_platform_default(bundle_dir: Path) -> str:
    """The onnxruntime version the bundle was built with, else the installed one."""
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        built = manifest.get("build", {}).get("versions", {}).get("onnxruntime")
    except (OSError, ValueError, AttributeError):
        built = None
    if isinstance(built, str):
        return built
    import onnxruntime

    return str(onnxruntime.__version__)


def publish(
    bundle_dir: Annotated[
        Path,
        typer.Argument(help="Bundle directory (manifest.json and its models).", file_okay=False),
    ],
    name: Annotated[str, typer.Option("--name", help="Bundle name.", show_default=False)],
    version: Annotated[str, typer.Option("--version", help="Bundle version.", show_default=False)],
    region: Annotated[
        list[str],
        typer.Option(
            "--region",
            help="A region the bundle may run in (repeat; * for any).",
            show_default=False,
        ),
    ],
    release: Annotated[
        int | None,
        typer.Option(help="Release counter (default: one more than the highest of NAME)."),
    ] = None,
    onnxruntime: Annotated[
        str | None,
        typer.Option(
            "--onnxruntime",
            help="Lowest onnxruntime version it runs on (default: the one it was built with).",
        ),
    ] = None,
    execution_provider: Annotated[
        str, typer.Option(help="onnxruntime execution provider it runs on.")
    ] = "CPUExecutionProvider",
    min_agent_version: Annotated[
        str | None,
        typer.Option(help="Lowest agent version that may run it (default: this fogline's)."),
    ] = None,
    no_deltas: Annotated[
        bool,
        typer.Option(
            "--no-deltas",
            help="Publish no deltas from the previous release of NAME (sites download "
            "changed files whole).",
        ),
    ] = False,
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Release the bundle in DIR into the catalogue as NAME VERSION, signed with the
    release keys. The release counter must be greater than every earlier one of NAME.
    Each changed file also gets a delta from the previous release of NAME, published as
    its own signed target when it is much smaller than the file."""
    with _errors_to_exit():
        from fogline import __version__
        from fogline.sync import Bundle, Platform, model_signatures

        target = _home(home, keys)
        target.writer("catalogue")  # an uninitialised home fails before the models load
        bundle = Bundle.load(bundle_dir)
        released = target.publish(
            bundle_dir,
            name=name,
            version=version,
            release=release,
            platform=Platform(
                onnxruntime or _bundle_platform_default(bundle_dir), execution_provider
            ),
            regions=tuple(region),
            min_agent_version=min_agent_version or __version__,
            signatures=model_signatures(bundle),
            deltas=0 if no_deltas else 1,
        )
        deltas = target.catalogue().deltas(released)
    if as_json:
        _print_json(
            {
                **released.to_dict(),
                "deltas": [
                    {
                        "file": d.file,
                        "base": d.base_sha256,
                        "bytes": d.length,
                        "file_bytes": d.result_length,
                    }
                    for d in deltas
                ],
            }
        )
    else:
        console = Console()
        console.print(
            f"released {escape(released.id)} (release {released.release}, manifest "
            f"sha256 {released.sha256[:16]}…)"
        )
        for d in deltas:
            console.print(
                f"  delta {escape(d.file)} from {d.base_sha256[:16]}…: {d.length} of "
                f"{d.result_length} bytes ({d.length / max(d.result_length, 1):.1%})"
            )


bundle_app.command("publish", short_help="Release a bundle into the catalogue.")(publish)
model_app.command("publish", short_help="Release a bundle into the catalogue.")(publish)


def _release_row(release: Release) -> dict[str, Any]:
    return release.to_dict()


@bundle_app.command("ls", short_help="List every released bundle.")
def bundle_ls(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """List every released bundle."""
    with _errors_to_exit():
        releases = _home(home, None).catalogue().releases()
    if as_json:
        _print_json({"bundles": [_release_row(r) for r in releases]})
        return
    table = Table(title="released bundles", title_justify="left")
    for column in ("bundle", "release", "platform", "regions", "min agent", "manifest sha256"):
        table.add_column(column, overflow="fold")
    for r in releases:
        table.add_row(
            escape(r.id),
            str(r.release),
            escape(str(r.platform)),
            escape(", ".join(r.regions)),
            escape(r.min_agent_version),
            r.sha256[:16] + "…",
        )
    Console().print(table)


def _split_id(bundle: str) -> tuple[str, str]:
    name, sep, version = bundle.partition(":")
    if not sep or not name or not version:
        name, sep, version = bundle.partition("@")
    if not sep or not name or not version:
        raise ValueError(f"{bundle!r} must be NAME:VERSION")
    return name, version


@bundle_app.command("show", short_help="Describe one released bundle.")
def bundle_show(
    bundle: Annotated[str, typer.Argument(help="NAME:VERSION", show_default=False)],
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Describe one released bundle: its release fields, files and signatures."""
    with _errors_to_exit():
        name, version = _split_id(bundle)
        catalogue = _home(home, None).catalogue()
        release = catalogue.get(name, version)
        if release is None:
            raise ValueError(f"{name}:{version} is not released")
        manifest = catalogue.manifest(release)
    data = {
        **release.to_dict(),
        "files": manifest.get("files", {}),
        "signatures": manifest.get("signatures", {}),
        "thresholds": manifest.get("thresholds", {}),
        "codec": manifest.get("codec", {}),
    }
    if as_json:
        _print_json(data)
        return
    table = Table(title=escape(release.id), title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key in ("release", "min_agent_version", "length", "sha256"):
        table.add_row(key, escape(str(data[key])))
    table.add_row("platform", escape(str(release.platform)))
    table.add_row("regions", escape(", ".join(release.regions)))
    for fname, info in sorted(_mapping(data["files"]).items()):
        table.add_row(
            f"file {escape(fname)}", f"{info.get('bytes')} B, sha256 {info.get('sha256')}"
        )
    for part, sig in sorted(_mapping(data["signatures"]).items()):
        for kind in ("inputs", "outputs"):
            for tensor in sig.get(kind, []):
                table.add_row(
                    f"{part} {kind[:-1]}",
                    escape(f"{tensor.get('name')}: {tensor.get('type')} {tensor.get('shape')}"),
                )
    Console().print(table)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@bundle_app.command("assign", short_help="Tell sites which bundle to run.")
def bundle_assign(
    bundle: Annotated[str, typer.Argument(help="NAME:VERSION", show_default=False)],
    site: Annotated[
        list[str], typer.Option("--site", help="Site to run it (repeat).", show_default=False)
    ],
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Tell sites, through the director, to run a released bundle."""
    with _errors_to_exit():
        name, version = _split_id(bundle)
        release = _home(home, keys).assign(site, name, version)
    if as_json:
        _print_json({"bundle": release.id, "sites": sorted(site)})
    else:
        Console().print(f"{escape(release.id)} assigned to {escape(', '.join(sorted(site)))}")


# ----------------------------------------------------------------------------- agent


@agent_app.command("enroll", short_help="Provision this site once.")
def agent_enroll(
    catalogue_root: Annotated[
        Path,
        typer.Option("--catalogue-root", help="The catalogue's root.json.", dir_okay=False),
    ],
    director_root: Annotated[
        Path,
        typer.Option("--director-root", help="The director's root.json.", dir_okay=False),
    ],
    site: Annotated[str, typer.Option("--site", help="Site name.", show_default=False)],
    region: Annotated[str, typer.Option("--region", help="Site's region.", show_default=False)],
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Site's sync state (default: $FOGLINE_STATE_DIR/sync, else "
            "~/.local/state/fogline/sync).",
            file_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Provision this site once: trust anchors, name, region and a site key readable by
    its owner only. Prints the site's public key, which the rollout service registers."""
    with _errors_to_exit():
        from fogline.sync import enroll

        identity = enroll(
            state_dir if state_dir is not None else default_site_state(),
            catalogue_root,
            director_root,
            site,
            region,
        )
    data = {
        "site": identity.site,
        "region": identity.region,
        "state_dir": str(identity.state_dir),
        "public_key": {"keyid": identity.public_key.keyid, **identity.public_key.to_dict()},
    }
    if as_json:
        _print_json(data)
    else:
        Console().print(
            f"site {escape(identity.site)} ({escape(identity.region)}) enrolled in "
            f"{escape(str(identity.state_dir))}; site key {identity.public_key.keyid[:16]}…"
        )


# ----------------------------------------------------------------------- air-gapped


@bundle_app.command("export", short_help="Write one file that carries a bundle to a site.")
def bundle_export(
    bundle: Annotated[str, typer.Argument(help="NAME:VERSION", show_default=False)],
    site: Annotated[str, typer.Option("--site", help="The site it is for.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The file to write (a tar).", dir_okay=False, show_default=False
        ),
    ],
    home: HomeOption = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write one file holding what SITE needs to verify and install a released bundle
    without a network: both repositories' metadata and the bundle's files. The site is
    assigned the bundle first when the director does not name it yet (the director's
    online keys must be present then)."""
    with _errors_to_exit():
        from fogline.sync import export_bundle

        name, version = _split_id(bundle)
        summary = export_bundle(_home(home, keys), name, version, site, output)
    data = summary.to_dict()
    if as_json:
        _print_json(data)
        return
    console = Console()
    if summary.assigned:
        console.print(f"{escape(summary.release.id)} assigned to {escape(site)}")
    console.print(
        f"exported {escape(summary.release.id)} for {escape(site)} to {escape(str(output))} "
        f"({summary.size_bytes} B, {len(summary.members)} files); import it before "
        f"{data['expires']}, when the metadata inside expires"
    )


def _site_platform() -> tuple[str, tuple[str, ...]]:
    import onnxruntime

    return str(onnxruntime.__version__), tuple(onnxruntime.get_available_providers())


SiteStateOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Site's sync state (default: $FOGLINE_STATE_DIR/sync, else "
        "~/.local/state/fogline/sync).",
        file_okay=False,
    ),
]


#: Exit codes of ``fogline agent import`` by outcome (docs/agent.md, "Imports").
IMPORT_EXIT = {"ok": 0, "refused": 2, "error": FAILED}


@agent_app.command("import", short_help="Verify and install a bundle from an export file.")
def agent_import(
    file: Annotated[
        Path,
        typer.Argument(help="The file `fogline bundle export` wrote.", dir_okay=False),
    ],
    state_dir: SiteStateOption = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="With a running agent: wait for its result (else only hand the file over).",
        ),
    ] = True,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="How long to wait for a running agent.", min=0)
    ] = 120.0,
    as_json: JsonOption = False,
) -> None:
    """Verify the bundle an export file carries exactly as a refresh over the network
    does and install it as an online update would. With no agent running on the site it
    is installed here (loaded and warmed up once, recorded as what the next `fogline agent
    run` starts on); while an agent runs (it holds the site's update lock) the file is
    handed to it, and it verifies and swaps it in hot. Exits 0 when installed (or already
    installed), 2 when refused, 1 when a file cannot be read or written or no result came
    within --timeout-s."""
    with _errors_to_exit():
        from fogline.edge_agent._installed import hand_over_import, update_lock
        from fogline.edge_agent._updater import StandaloneHost, import_standalone
        from fogline.edge_agent.errors import UpdateError, UpdateLockedError
        from fogline.sync import SiteIdentity

        state = state_dir if state_dir is not None else default_site_state()
        SiteIdentity.load(state)  # not enrolled: one line, exit 1, nothing written
        handed: Path | None = None
        try:
            try:
                with update_lock(state):
                    result = import_standalone(state, file, StandaloneHost(warmup_runs=1))
            except UpdateLockedError:
                handed = hand_over_import(state, file)
                if not wait:
                    _print_handed(handed, file, as_json)
                    return
                result = _wait_for_agent(state, handed, file, timeout_s)
        except UpdateError as exc:
            fail(str(exc), code=FAILED)
    _print_import(result.to_dict(), state, file, handed, as_json)
    raise typer.Exit(IMPORT_EXIT[result.outcome])


def _print_handed(handed: Path, file: Path, as_json: bool) -> None:
    data = {"outcome": "handed_over", "file": str(file), "handed_over": str(handed)}
    if as_json:
        _print_json(data)
    else:
        Console().print(
            f"{escape(str(file))} handed to the running agent as {escape(str(handed))}; "
            "`fogline agent status` shows the result"
        )


def _wait_for_agent(state: Path, handed: Path, file: Path, timeout_s: float) -> ImportResult:
    """The running agent's result for ``handed``; it is taken back and imported here
    when the lock comes free with the file still waiting (the holder stopped, or was
    not an agent). An ``error`` result when none came within ``timeout_s``."""
    import time

    from fogline.edge_agent._installed import (
        ImportResult,
        read_import_result,
        result_path,
        update_lock,
    )
    from fogline.edge_agent._updater import StandaloneHost, import_standalone
    from fogline.edge_agent.errors import UpdateLockedError

    deadline = time.monotonic() + timeout_s
    next_lock_try = time.monotonic() + 2.0
    while True:
        got = read_import_result(handed)
        if got is not None:
            result_path(handed).unlink(missing_ok=True)
            return got
        now = time.monotonic()
        if now >= next_lock_try and handed.exists():
            next_lock_try = now + 2.0
            try:
                with update_lock(state):
                    if handed.exists():
                        taken = import_standalone(state, handed, StandaloneHost(warmup_runs=1))
                        handed.unlink(missing_ok=True)
                        return taken
            except UpdateLockedError:
                pass
        if now >= deadline:
            return ImportResult(
                "error",
                str(file),
                f"the running agent did not answer within {timeout_s:g} s; {handed} stays "
                "and is imported when the agent gets to it",
            )
        time.sleep(0.1)


def _print_import(
    data: dict[str, Any], state: Path, file: Path, handed: Path | None, as_json: bool
) -> None:
    from fogline.sync import SyncError, read_freshness

    if handed is not None:  # messages name the file the operator gave
        data["message"] = data["message"].replace(str(handed), str(file))
    data["file"] = str(file)
    data["handed_over"] = None if handed is None else str(handed)
    try:
        data["freshness"] = read_freshness(state).to_dict()
    except SyncError:
        data["freshness"] = None
    release = data.pop("release")
    data["bundle"] = release if release is not None else data["bundle"]
    if as_json:
        _print_json(data)
        return
    if data["outcome"] != "ok":
        typer.echo(f"error: {data['message']}", err=True)
        return
    where = "the running agent" if handed is not None else escape(str(data["path"]))
    what = "already installed" if data["already_installed"] else "installed"
    expires = data["freshness"]["expires"] if data["freshness"] else "?"
    Console().print(
        f"{escape(release['name'])}@{escape(release['version'])} (release "
        f"{release['release']}) {what} in {where}; trusted metadata valid until {expires}"
    )


@agent_app.command("freshness", short_help="When the site's trusted metadata expires.")
def agent_freshness(state_dir: SiteStateOption = None, as_json: JsonOption = False) -> None:
    """Show each repository's trusted metadata versions and when they expire. Exits 1
    when any has expired (the site keeps running what it has, but refreshes and imports
    fail until newer metadata arrives)."""
    with _errors_to_exit():
        from fogline.sync import read_freshness

        freshness = read_freshness(state_dir if state_dir is not None else default_site_state())
    data = freshness.to_dict()
    if as_json:
        _print_json(data)
    else:
        table = Table(title="trusted metadata", title_justify="left")
        for column in ("repository", "role", "version", "expires", "expired"):
            table.add_column(column)
        for repo, r in data["repositories"].items():
            for role, info in r["roles"].items():
                table.add_row(
                    repo, escape(role), str(info["version"]), info["expires"],
                    "yes" if info["expired"] else "",
                )  # fmt: skip
            for role in r["missing"]:
                table.add_row(repo, role, "-", "never fetched", "")
        Console().print(table)
        Console().print("stale: refresh or import an export" if freshness.stale else "fresh")
    if freshness.stale:
        raise typer.Exit(FAILED)
