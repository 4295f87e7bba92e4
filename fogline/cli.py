"""The ``fogline`` command: one entry point, subcommand groups contributed by each package.

Subcommand modules import their heavy dependencies (onnxruntime, torch, FastAPI) inside
the commands, so ``fogline --help`` stays fast and an edge-only install works.
"""

from __future__ import annotations

import sys

import typer

from fogline import __version__
from fogline._bench import app as bench_app
from fogline._cli_agent import app as agent_app
from fogline._cli_cloud import app as cloud_app
from fogline._cli_model import app as model_app
from fogline._cli_sync import agent_app as agent_sync_app
from fogline._cli_sync import bundle_app, keys_app
from fogline._cli_sync import model_app as model_sync_app
from fogline._demo import demo

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
app.add_typer(keys_app, name="keys", help="Create and rotate the sync's roots of trust.")
app.add_typer(bundle_app, name="bundle", help="Release bundles and list what is released.")
model_app.add_typer(model_sync_app)
agent_app.add_typer(agent_sync_app)
app.command("demo")(demo)


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
# Commands whose whole set of optional modules one extra brings.
_EXTRA_OF_COMMAND = {"demo": "demo", "bench": "demo"}


def missing_extra_message(argv: list[str], module: str) -> str:
    """The one line that names the extra to install for a missing ``module``."""
    top = module.split(".", maxsplit=1)[0]
    command = next((a for a in argv if not a.startswith("-")), "")
    extra = _EXTRA_OF_COMMAND.get(command) or _EXTRA_OF_MODULE.get(top, "all")
    words = " ".join(a for a in argv[:2] if not a.startswith("-")) or "this command"
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
