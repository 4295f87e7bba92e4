"""``fogline agent import`` on an air-gapped site: a real agent process (``fogline agent
run`` with a ``[sync]`` section whose URL nothing answers, a private Mosquitto) and the
real command. An import while the agent runs is handed to it and swapped in hot, inputs
answered throughout; one while it is stopped is what the next run serves; refused exports
(another site's, tampered) change nothing while the agent serves on."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fogline._broker import free_port
from fogline.edge_agent._installed import IMPORTS, read_installed, read_status, update_lock
from fogline.sync import export_bundle
from tests.edge_agent._sync_fleet import SyncFleet, make_sync_fleet, wait_for

pytestmark = pytest.mark.timeout(300)

FOGLINE = str(Path(sys.executable).with_name("fogline"))
FRAME = {"data": [[[7] * 8] * 8]}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SyncFleet]:
    f = make_sync_fleet(tmp_path / "fleet")
    try:
        yield f
    finally:
        f.server.stop()


def _export(fleet: SyncFleet, version: str, tmp_path: Path, site: str | None = None) -> Path:
    out = tmp_path / f"tiny-{version}-{site or fleet.site}.tar"
    export_bundle(fleet.home, "tiny", version, site or fleet.site, out)
    return out


def _import(fleet: SyncFleet, file: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    wait = () if "--timeout-s" in args else ("--timeout-s", "60")
    done = subprocess.run(
        [FOGLINE, "agent", "import", str(file), "--state-dir", str(fleet.state_dir), "--json",
         *wait, *args],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stderr


class _Agent:
    """``fogline agent run`` on a site whose sync URL nothing answers (air-gapped)."""

    def __init__(self, tmp_path: Path, fleet: SyncFleet, broker: Any, topic_prefix: str) -> None:
        self.port = free_port()
        self.log = tmp_path / "agent.log"
        self.conf = tmp_path / "agent.toml"
        self.conf.write_text(
            f'site = "{fleet.site}"\nbundle_dir = "{fleet.bundles["1"]}"\n'
            "cloud_timeout_ms = 300\n"
            f'[broker]\nurl = "{broker.url}"\ntopic_prefix = "{topic_prefix}"\n'
            f"[http]\nport = {self.port}\n[runtime]\nwarmup_runs = 1\n"
            f'[outbox]\npath = "{tmp_path}/outbox.db"\n'
            f'[sync]\nstate_dir = "{fleet.state_dir}"\n'
            f'url = "http://127.0.0.1:{free_port()}"\npoll_s = 300\nreport_s = 300\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> _Agent:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [FOGLINE, "agent", "run", "--config", str(self.conf)], stdout=out, stderr=out
            )
        wait_for(lambda: self.answer() is not None, 60)
        return self

    def answer(self) -> dict[str, Any] | None:
        try:
            r = httpx.post(f"http://127.0.0.1:{self.port}/v1/infer", json=FRAME, timeout=10)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def bundle(self) -> str | None:
        got = self.answer()
        return None if got is None else got["bundle"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0, self.log.read_text()[-3000:]


@pytest.fixture
def agent(tmp_path: Path, fleet: SyncFleet, broker: Any, topic_prefix: str) -> Iterator[_Agent]:
    a = _Agent(tmp_path, fleet, broker, topic_prefix)
    try:
        yield a
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(10)


def _running(fleet: SyncFleet) -> str | None:
    current = read_installed(fleet.state_dir).current
    return None if current is None else current.id


def _on_tiny_1(fleet: SyncFleet, agent: _Agent, tmp_path: Path) -> None:
    """The site imported tiny@1 while stopped, and the agent runs it."""
    code, got, err = _import(fleet, _export(fleet, "1", tmp_path))
    assert code == 0, err
    assert got["handed_over"] is None
    agent.start()
    assert agent.bundle() == "tiny@1"


def test_an_import_while_the_agent_runs_swaps_hot_and_answers_every_input(
    fleet: SyncFleet, agent: _Agent, tmp_path: Path
) -> None:
    _on_tiny_1(fleet, agent, tmp_path)
    assert agent.proc is not None
    pid = agent.proc.pid
    export_2 = _export(fleet, "2", tmp_path)
    answers: list[int | str] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"http://127.0.0.1:{agent.port}/v1/infer", json=FRAME)
                answers.append(r.json()["bundle"] if r.status_code == 200 else r.status_code)

    feeder = threading.Thread(target=stream)
    feeder.start()
    try:
        wait_for(lambda: len(answers) >= 5)
        code, got, err = _import(fleet, export_2)
        wait_for(lambda: answers[-1:] == ["tiny@2"])
        wait_for(lambda: answers.count("tiny@2") >= 5)
    finally:
        stop.set()
        feeder.join(30)
    assert code == 0, err
    assert got["outcome"] == "ok"
    assert got["already_installed"] is False
    assert got["handed_over"] is not None
    assert got["previous"] == "tiny@1"
    assert got["bundle"]["version"] == "2"
    # No restart, no input lost: every one answered, by tiny@1 and then by tiny@2.
    assert agent.proc.poll() is None
    assert agent.proc.pid == pid
    assert set(answers) == {"tiny@1", "tiny@2"}
    switch = answers.index("tiny@2")
    assert set(answers[:switch]) == {"tiny@1"}
    assert set(answers[switch:]) == {"tiny@2"}
    installed = read_installed(fleet.state_dir)
    assert installed.current is not None
    assert installed.current.id == "tiny@2"
    assert installed.previous is not None
    assert installed.previous.id == "tiny@1"
    releases = json.loads((fleet.state_dir / "installed.json").read_text())["releases"]
    assert releases == {"tiny": 2}
    # The handed file and its result are gone; the directory is the owner's only.
    imports = fleet.state_dir / IMPORTS
    assert list(imports.iterdir()) == []
    assert stat.S_IMODE(imports.stat().st_mode) == 0o700
    # The same file again: already installed, nothing swapped.
    code, again, err = _import(fleet, export_2)
    assert (code, again["outcome"], again["already_installed"]) == (0, "ok", True), err
    assert agent.bundle() == "tiny@2"
    status = subprocess.run(
        [FOGLINE, "agent", "status", "--state-dir", str(fleet.state_dir), "--json"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    shown = json.loads(status.stdout)
    assert shown["running"] == "tiny@2"
    assert shown["last_import"]["outcome"] == "ok"
    assert shown["last_import"]["message"] == "tiny@2 already installed"
    agent.stop()


def test_an_import_while_the_agent_is_stopped_is_what_the_next_run_serves(
    fleet: SyncFleet, agent: _Agent, tmp_path: Path
) -> None:
    # The config names tiny@1's directory; the site imported tiny@2.
    code, got, err = _import(fleet, _export(fleet, "2", tmp_path))
    assert code == 0, err
    assert (got["outcome"], got["handed_over"], got["previous"]) == ("ok", None, None)
    assert _running(fleet) == "tiny@2"
    assert read_status(fleet.state_dir)["last_import"]["bundle"] == "tiny@2"
    agent.start()
    assert agent.bundle() == "tiny@2"
    agent.stop()


def _tampered(file: Path) -> Path:
    data = bytearray(file.read_bytes())
    with tarfile.open(file) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".edge.onnx"))
    data[member.offset_data + member.size // 2] ^= 0x01
    out = file.with_name("tampered-" + file.name)
    out.write_bytes(bytes(data))
    return out


def _refused_while_serving(
    fleet: SyncFleet, agent: _Agent, file: Path, needle: str
) -> dict[str, Any]:
    before = (fleet.state_dir / "current.json").read_bytes()
    floor = (fleet.state_dir / "installed.json").read_bytes()
    code, got, err = _import(fleet, file)
    assert code == 2, err
    assert got["outcome"] == "refused"
    assert got["handed_over"] is not None
    assert needle in got["message"]
    assert agent.bundle() == "tiny@1"
    assert (fleet.state_dir / "current.json").read_bytes() == before
    assert (fleet.state_dir / "installed.json").read_bytes() == floor
    assert not (fleet.state_dir / "bundles" / "tiny" / "2").exists()
    assert list((fleet.state_dir / IMPORTS).iterdir()) == []
    assert agent.proc is not None
    assert agent.proc.poll() is None
    return got


def test_attack_import_for_another_site_is_refused_while_the_agent_serves_on(
    fleet: SyncFleet, agent: _Agent, tmp_path: Path
) -> None:
    _on_tiny_1(fleet, agent, tmp_path)
    other = _export(fleet, "2", tmp_path, site="site-b")
    got = _refused_while_serving(fleet, agent, other, "site-b")
    assert got["message"] == f"{other} is an export for site 'site-b', not 'site-a'"
    agent.stop()


def test_attack_tampered_export_is_refused_while_the_agent_serves_on(
    fleet: SyncFleet, agent: _Agent, tmp_path: Path
) -> None:
    _on_tiny_1(fleet, agent, tmp_path)
    got = _refused_while_serving(
        fleet, agent, _tampered(_export(fleet, "2", tmp_path)), "edge.onnx"
    )
    assert got["message"].startswith("catalogue: ")
    shown = read_status(fleet.state_dir)["last_import"]
    assert shown["outcome"] == "refused"
    agent.stop()


def test_an_import_handed_to_a_holder_that_never_answers_times_out_with_exit_1(
    fleet: SyncFleet, tmp_path: Path
) -> None:
    file = _export(fleet, "1", tmp_path)
    with update_lock(fleet.state_dir):
        code, got, _ = _import(fleet, file, "--timeout-s", "1")
        assert code == 1
        assert got["outcome"] == "error"
        assert "did not answer within 1 s" in got["message"]
        waiting = list((fleet.state_dir / IMPORTS).iterdir())
        assert len(waiting) == 1
        assert stat.S_IMODE(waiting[0].stat().st_mode) == 0o600
        code, handed, _ = _import(fleet, file, "--no-wait")
        assert (code, handed["outcome"]) == (0, "handed_over")
    assert _running(fleet) is None


def test_an_import_handed_over_is_taken_back_when_the_holder_goes_away(
    fleet: SyncFleet, tmp_path: Path
) -> None:
    file = _export(fleet, "1", tmp_path)
    env = dict(os.environ)
    with update_lock(fleet.state_dir):
        proc = subprocess.Popen(
            [FOGLINE, "agent", "import", str(file), "--state-dir", str(fleet.state_dir),
             "--json", "--timeout-s", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        wait_for(lambda: any((fleet.state_dir / IMPORTS).glob("*.tar")), 60)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert (got["outcome"], got["already_installed"]) == ("ok", False)
    assert _running(fleet) == "tiny@1"
    assert list((fleet.state_dir / IMPORTS).iterdir()) == []
