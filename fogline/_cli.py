"""Small helpers shared by every ``fogline`` subcommand."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

__all__ = ["USAGE_ERROR", "fail"]

USAGE_ERROR = 2


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit (2 by default), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)
