"""Subcommands of this package (filled in by the package)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
