"""A taken HTTP port: the agent and the cloud each say so in one ``error:`` line and exit 1,
before they connect to a broker, create a database or announce the address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FOGLINE = str(Path(sys.executable).with_name("fogline"))


@pytest.fixture
def taken_port() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FOGLINE_STATE_DIR": str(cwd / "state")}
    return subprocess.run(
        [FOGLINE, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )


def test_the_agent_on_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, taken_port: int) -> None:
    proc = _run(
        "agent",
        "run",
        "--site",
        "site-a",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--port",
        str(taken_port),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use"]
    # Nothing was started: no outbox was made.
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_the_cloud_on_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, taken_port: int) -> None:
    db = tmp_path / "results.db"
    proc = _run(
        "cloud",
        "serve",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--port",
        str(taken_port),
        "--store",
        f"sqlite:///{db}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use"]
    assert not db.exists()  # the database was not created
