"""A real agent process (``fogline agent run``, a private Mosquitto, the stand-in sync
server) killed with SIGKILL at each step of an update: after a restart it answers from a
complete, verified bundle and converges to the desired one. Also: a damaged current
bundle falls back to the previous one; ``fogline agent update`` and ``status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fogline._broker import free_port
from fogline.edge_agent._config import SyncConfig
from fogline.edge_agent._installed import read_installed
from fogline.edge_agent._updater import CRASH_ENV, StandaloneHost, standalone_updater
from tests.edge_agent._sync_fleet import SyncFleet, make_sync_fleet, wait_for

FOGLINE = str(Path(sys.executable).with_name("fogline"))
FRAME = {"data": [[[7] * 8] * 8]}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SyncFleet]:
    f = make_sync_fleet(tmp_path / "fleet")
    try:
        yield f
    finally:
        f.server.stop()


def _install_first(fleet: SyncFleet) -> None:
    """The site runs tiny@1, installed as an update of its own."""
    fleet.assign("1")
    sync = SyncConfig(state_dir=fleet.state_dir, url=fleet.server.url)
    with standalone_updater(sync, StandaloneHost(warmup_runs=1)) as updater:
        assert updater.attempt().outcome == "installed"
    assert read_installed(fleet.state_dir).current.id == "tiny@1"  # type: ignore[union-attr]


def _config(tmp_path: Path, fleet: SyncFleet, broker: Any, topic_prefix: str, port: int) -> Path:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'site = "{fleet.site}"\nbundle_dir = "{fleet.bundles["1"]}"\ncloud_timeout_ms = 300\n'
        f'[broker]\nurl = "{broker.url}"\ntopic_prefix = "{topic_prefix}"\n'
        f"[http]\nport = {port}\n[runtime]\nwarmup_runs = 1\n"
        f'[outbox]\npath = "{tmp_path}/outbox.db"\n'
        f'[sync]\nstate_dir = "{fleet.state_dir}"\nurl = "{fleet.server.url}"\n'
        "poll_s = 0.5\nreport_s = 300\n"
    )
    return conf


def _start(conf: Path, log: Path, crash_at: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    with log.open("ab") as out:
        return subprocess.Popen(
            [FOGLINE, "agent", "run", "--config", str(conf)], stdout=out, stderr=out, env=env
        )


def _answer(port: int) -> dict[str, Any] | None:
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/infer", json=FRAME, timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _crash_and_recover(
    step: str, fleet: SyncFleet, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    """Run on tiny@1 with tiny@2 desired, SIGKILLed at ``step``; restart and converge."""
    _install_first(fleet)
    fleet.assign("2")
    port = free_port()
    conf = _config(tmp_path, fleet, broker, topic_prefix, port)
    log = tmp_path / "agent.log"
    proc = _start(conf, log, crash_at=step)
    try:
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The record names a complete bundle whose files match their hashes.
    current = read_installed(fleet.state_dir).current
    assert current is not None
    assert current.damage() is None
    assert current.id == "tiny@1"
    proc = _start(conf, log, crash_at=None)
    try:
        first = wait_for(lambda: _answer(port), 60)
        assert first["bundle"] in ("tiny@1", "tiny@2")
        wait_for(lambda: (a := _answer(port)) is not None and a["bundle"] == "tiny@2", 60)
        installed = read_installed(fleet.state_dir)
        assert installed.current is not None
        assert installed.current.id == "tiny@2"
        assert installed.current.damage() is None
        assert installed.previous is not None
        assert installed.previous.id == "tiny@1"
        # Nothing half-downloaded stays behind.
        assert sorted(p.name for p in (fleet.state_dir / "bundles" / "tiny").iterdir()) == [
            "1",
            "2",
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]


def test_crash_during_download_leaves_a_verified_bundle(
    fleet: SyncFleet, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    _crash_and_recover("download", fleet, broker, topic_prefix, tmp_path)


def test_crash_during_verify_leaves_a_verified_bundle(
    fleet: SyncFleet, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    _crash_and_recover("verify", fleet, broker, topic_prefix, tmp_path)


def test_crash_during_stage_leaves_a_verified_bundle(
    fleet: SyncFleet, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    _crash_and_recover("stage", fleet, broker, topic_prefix, tmp_path)


def test_crash_during_swap_leaves_a_verified_bundle(
    fleet: SyncFleet, broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    _crash_and_recover("swap", fleet, broker, topic_prefix, tmp_path)


def test_agent_update_and_status_commands_say_what_happened(
    fleet: SyncFleet, tmp_path: Path
) -> None:
    fleet.assign("1")
    args = ["--state-dir", str(fleet.state_dir)]
    cmd = [FOGLINE, "agent", "update", *args, "--url", fleet.server.url]
    done = subprocess.run(
        [*cmd, "--json"], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "installed"
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout.strip()) == (0, "up to date: tiny@1")
    status = subprocess.run(
        [FOGLINE, "agent", "status", *args, "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    got = json.loads(status.stdout)
    assert got["site"] == "site-a"
    assert got["running"] == "tiny@1"
    assert got["phase"] == "active"
    fleet.server.down = True
    down = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1
    assert "transport" in down.stderr
    with standalone_updater(
        SyncConfig(state_dir=fleet.state_dir, url=fleet.server.url), StandaloneHost()
    ):
        locked = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert locked.returncode == 1
    assert "another updater" in locked.stderr
