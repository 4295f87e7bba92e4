"""Service logging: JSON lines carry no ANSI colour copies, and uvicorn's server lines
are named ``uvicorn``, not ``uvicorn.error``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from fogline._cli import setup_logging


def _emit(name: str, level: int, message: str, color_message: str | None) -> None:
    fields: dict[str, object] = {"name": name, "levelno": level, "msg": message}
    fields["levelname"] = logging.getLevelName(level)
    if color_message is not None:
        fields["color_message"] = color_message
    (handler,) = logging.getLogger().handlers
    handler.handle(logging.makeLogRecord(fields))


@pytest.fixture
def restored_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("restored_root")
def test_json_lines_drop_uvicorns_colour_copy_and_name_its_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info", "json")
    # Straight to the handler setup_logging made: uvicorn's own logger configuration (left
    # by any uvicorn started earlier in this process) plays no part in what is tested.
    _emit("uvicorn.error", logging.INFO, "Started server process [42]", "\x1b[36mStarted\x1b[0m")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["logger"] == "uvicorn"
    assert record["message"] == "Started server process [42]"
    assert "color_message" not in record
    assert "\x1b" not in line


@pytest.mark.usefixtures("restored_root")
def test_text_lines_name_uvicorn_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text")
    _emit("uvicorn.error", logging.WARNING, "port in use", None)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert " WARNING uvicorn: port in use" in line
