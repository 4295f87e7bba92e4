"""Service logging: JSON lines carry no ANSI colour copies, and uvicorn's server lines
are named ``uvicorn``, not ``uvicorn.error``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from fogline._cli import setup_logging


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
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]", 42, extra={"color_message": "\x1b[36mStarted\x1b[0m"}
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["logger"] == "uvicorn"
    assert record["message"] == "Started server process [42]"
    assert "color_message" not in record
    assert "\x1b" not in line


@pytest.mark.usefixtures("restored_root")
def test_text_lines_name_uvicorn_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text")
    logging.getLogger("uvicorn.error").warning("port in use")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert " WARNING uvicorn: port in use" in line
