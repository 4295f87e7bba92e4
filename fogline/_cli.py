"""Small helpers shared by every ``fogline`` subcommand."""

from __future__ import annotations

import socket
import sys
from typing import Any, NoReturn

import typer

__all__ = ["SOFTWARE_ERROR", "USAGE_ERROR", "Status", "fail"]

USAGE_ERROR = 2
#: A service that stopped because part of it failed for good (a supervised thread whose
#: state cannot be trusted any more): sysexits' EX_SOFTWARE, so the service manager
#: restarts it and an operator can tell it from a bad configuration (2) or a start-up
#: failure (1).
SOFTWARE_ERROR = 70


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit (2 by default), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def bind_http(host: str, port: int) -> socket.socket:
    """A socket bound to the HTTP address, made before anything else starts: a taken
    port is one ``error:`` line and exit 1, before any broker connection, database or
    model is touched and before the address is announced. uvicorn serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", code=1)
    sock.set_inheritable(True)
    return sock


class Status:
    """What a long command is doing, as a rich spinner on stderr; nothing when ``show`` is
    false (``--json``). A live display: stop it before another one (a progress bar)."""

    def __init__(self, show: bool, text: str) -> None:
        self._status: Any = None
        if show:
            from rich.console import Console

            self._status = Console(stderr=True).status(text)

    def __enter__(self) -> Status:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _tidy_uvicorn(record: Any) -> bool:
    """uvicorn logs its server lines under ``uvicorn.error`` whatever their level, and adds
    a ``color_message`` copy with ANSI escapes, which a JSON formatter would ship as a
    field: name them ``uvicorn`` and drop the colours."""
    if record.name == "uvicorn.error":
        record.name = "uvicorn"
    if "color_message" in record.__dict__:
        del record.__dict__["color_message"]
    return True


def setup_logging(level: int | str, log_format: str = "text") -> None:
    """Configure the root logger for a service: ``text`` lines, or ``json`` (one JSON
    object a line, for log shippers) through python-json-logger."""
    import logging

    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format!r} must be text or json")
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_tidy_uvicorn)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


def settle_heap() -> None:
    """Move everything allocated so far out of the garbage collector's reach.

    A long-running server imports large libraries (onnxruntime, FastAPI, SQLAlchemy) whose
    objects live for the whole process; scanning them on every full collection stalled
    request handling for tens of milliseconds. Called once start-up is done, so later
    collections only look at objects made while serving.
    """
    import gc

    gc.collect()
    gc.freeze()
