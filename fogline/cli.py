"""The ``fogline`` command: one entry point, subcommand groups contributed by each package.

Subcommand modules import their heavy dependencies (onnxruntime, torch, FastAPI) inside
the commands, so ``fogline --help`` stays fast and an edge-only install works.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from fogline import __version__
from fogline._bench import app as bench_app
from fogline._cli import CONTEXT_SETTINGS, usage_error_line
from fogline._cli_agent import app as agent_app
from fogline._cli_cloud import app as cloud_app
from fogline._cli_model import app as model_app
from fogline._cli_rollout import fleet_app, rollout_app
from fogline._cli_sync import agent_app as agent_sync_app
from fogline._cli_sync import bundle_app, keys_app
from fogline._cli_sync import model_app as model_sync_app
from fogline._demo import demo

__all__ = ["app", "main"]


class _Fogline(TyperGroup):
    """The root command: a usage error (a bad option value, an unknown option or command,
    a missing argument) is one ``error: …`` line on stderr and exit code 2, as every other
    bad input is, instead of Typer's box of several lines."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except typer.Abort:
            if not standalone_mode:
                raise
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        except typer.TyperException as exc:
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":
                # a bare group: its help is the answer (Typer prints it, exit code 2)
                typer.echo(exc.format_message(), err=True)
            else:
                print(f"error: {usage_error_line(exc)}", file=sys.stderr)
            sys.exit(getattr(exc, "exit_code", 2))
        if not standalone_mode:
            return result
        # without standalone mode, an exit code raised by a command comes back as the result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="fogline",
    help="Edge–cloud hybrid inference serving.",
    cls=_Fogline,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: rich markup would swallow config section names such as [broker] and
    # keep the docstrings' line breaks; plain help wraps paragraphs to the terminal.
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)
app.add_typer(model_app, name="model", help="Split, quantize and build models.")
app.add_typer(agent_app, name="agent", help="Run the edge agent; make sample inputs for it.")
app.add_typer(cloud_app, name="cloud", help="Run the cloud worker and API.")
app.add_typer(bench_app, name="bench", help="Measure speed, size and accuracy.")
app.add_typer(keys_app, name="keys", help="Create and rotate the sync's roots of trust.")
app.add_typer(bundle_app, name="bundle", help="Release bundles and list what is released.")
app.add_typer(rollout_app, name="rollout", help="Roll bundles out to fleets in waves.")
app.add_typer(fleet_app, name="fleet", help="Register sites and list the fleet.")
model_app.add_typer(model_sync_app)
agent_app.add_typer(agent_sync_app)
app.command("demo", short_help="The whole system on one box.")(demo)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the installed version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """Edge–cloud hybrid inference serving."""


@app.command("version")
def version() -> None:
    """Print the installed version."""
    print(__version__)


# The extra that brings each optional top-level module (pyproject's optional-dependencies).
_EXTRA_OF_MODULE = {
    "onnxruntime": "edge",
    "paho": "edge",
    "zstandard": "edge",
    "cryptography": "edge",
    "tuf": "edge",
    "securesystemslib": "edge",
    "fastapi": "edge",
    "starlette": "edge",
    "pydantic": "edge",
    "uvicorn": "edge",
    "prometheus_client": "edge",
    "pythonjsonlogger": "edge",
    "sqlalchemy": "cloud",
    "psycopg": "postgres",
    "onnx": "tools",
    "torch": "tools",
    "sklearn": "tools",
    "tensorrt": "gpu",
    "amqtt": "broker",
    "httpx": "demo",
}
# Commands whose whole set of optional modules one extra brings. `agent sample` draws its
# frames from scikit-learn's bundled digits: `demo` brings them without torch.
_EXTRA_OF_COMMAND = {"demo": "demo", "bench": "demo", "agent sample": "demo"}


def missing_extra_message(argv: list[str], module: str) -> str:
    """The one line that names the extra to install for a missing ``module``."""
    top = module.split(".", maxsplit=1)[0]
    command = next((a for a in argv if not a.startswith("-")), "")
    words = " ".join(a for a in argv[:2] if not a.startswith("-"))
    extra = (
        _EXTRA_OF_COMMAND.get(words)
        or _EXTRA_OF_COMMAND.get(command)
        or _EXTRA_OF_MODULE.get(top, "all")
    )
    words = words or "this command"
    return (
        f"error: fogline {words} needs the '{extra}' extra (missing module {top}): "
        f"pip install 'fogline[{extra}]'"
    )


def main() -> None:
    """Console entry point."""
    try:
        sys.exit(app())
    except ModuleNotFoundError as exc:
        print(missing_extra_message(sys.argv[1:], exc.name or "?"), file=sys.stderr)
        sys.exit(2)
