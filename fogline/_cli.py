"""Small helpers shared by every ``fogline`` subcommand."""

from __future__ import annotations

import contextlib
import socket
import sys
import urllib.parse
from typing import Any, NoReturn

import typer

__all__ = [
    "CONTEXT_SETTINGS",
    "SOFTWARE_ERROR",
    "USAGE_ERROR",
    "Status",
    "fail",
    "usage_error_line",
]

USAGE_ERROR = 2
#: A service that stopped because part of it failed for good (a supervised thread whose
#: state cannot be trusted any more): sysexits' EX_SOFTWARE, so the service manager
#: restarts it and an operator can tell it from a bad configuration (2) or a start-up
#: failure (1).
SOFTWARE_ERROR = 70

CONTEXT_SETTINGS: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    # Help is wrapped to the terminal, but no wider than this: long lines read badly.
    "max_content_width": 100,
}
"""Settings of the root command's context; every subcommand inherits them."""


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit (2 by default), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _param_name(param: Any) -> str:
    """How the user spells a parameter: its long option (``--scope``), or an argument's
    name in capitals (``MODEL``)."""
    if getattr(param, "param_type_name", "") == "argument":
        return str(param.metavar or param.name or "argument").upper()
    opts = [o for o in getattr(param, "opts", ()) if o.startswith("--")] or list(
        getattr(param, "opts", ())
    )
    return max(opts, key=len) if opts else str(getattr(param, "name", "?"))


def _sentence(message: str) -> str:
    """``message`` on one line, as a clause: no trailing period, first letter lower-case
    unless the word is an acronym or a name in quotes."""
    text = " ".join(message.split()).removeprefix("Value error, ").rstrip(".")
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    return text


def usage_error_line(exc: typer.TyperException) -> str:
    """The one line (after ``error: ``) that says what was wrong with a command line.

    Typer's own errors (a bad option value, an unknown option or command, a missing
    argument) are boxes of several lines; the README promises one line. A bad value is
    ``--scope: 'write' is not one of 'infer', 'read', 'admin'``; what leaves the user
    guessing how to spell the command right points at its ``--help``.
    """
    ctx = getattr(exc, "ctx", None)
    see = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    param = getattr(exc, "param", None)
    if hasattr(exc, "param_type"):  # a missing option or argument
        kind = getattr(exc, "param_type", None) or getattr(param, "param_type_name", "parameter")
        what = _param_name(param) if param is not None else str(exc.message or "a parameter")
        return f"missing {kind} {what}{see}"
    if isinstance(exc, typer.BadParameter) and param is not None:
        return f"{_param_name(param)}: {_sentence(exc.message)}"
    if hasattr(exc, "possibilities"):  # an unknown option
        name = str(getattr(exc, "option_name", "") or "")
        options = sorted(getattr(exc, "possibilities", None) or ())
        if options:
            return f"no such option: {name}; did you mean {' or '.join(options)}?"
        return f"no such option: {name}{see}"
    text = _sentence(exc.format_message()).replace(". Did you mean", "; did you mean")
    return text if "did you mean" in text else f"{text}{see}"


def broker_url_option(value: str | None) -> str | None:
    """Check a ``--broker`` URL as the command line is read, so a bad one is a usage error
    naming the option (``--broker: broker URL … must start with mqtt://``); a password in
    it is never repeated."""
    if value is None:
        return None
    from fogline.messaging import parse_broker_url

    try:
        parse_broker_url(value)
    except ValueError as exc:
        message = str(exc)
        with contextlib.suppress(ValueError):
            password = urllib.parse.urlsplit(value).password
            if password:
                message = message.replace(password, "***")
        raise typer.BadParameter(message) from None
    return value


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
