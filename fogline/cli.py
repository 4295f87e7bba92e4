"""The ``fogline`` command: one entry point, subcommand groups contributed by each package.

Subcommand modules import their heavy dependencies (onnxruntime, torch, FastAPI) inside
the commands, so ``fogline --help`` stays fast and an edge-only install works.
"""

from __future__ import annotations

import sys

import typer

from fogline import __version__
from fogline._bench import app as bench_app
from fogline._demo import demo
from fogline.cloud_service.cli import app as cloud_app
from fogline.compression.cli import app as model_app
from fogline.edge_agent.cli import app as agent_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="fogline",
    help="Edge–cloud hybrid inference serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model_app, name="model", help="Split, quantize and build models.")
app.add_typer(agent_app, name="agent", help="Run the edge agent.")
app.add_typer(cloud_app, name="cloud", help="Run the cloud worker and API.")
app.add_typer(bench_app, name="bench", help="Measure speed, size and accuracy.")
app.command("demo")(demo)


@app.command("version")
def version() -> None:
    """Print the installed version."""
    print(__version__)


def main() -> None:
    """Console entry point."""
    sys.exit(app())
