"""``fogline fleet`` and ``fogline rollout`` through the real CLI, on a real sync home and
fleet store, with sites enrolled by ``fogline agent enroll`` and real signed reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fogline.cli import app
from fogline.sync import SiteIdentity, StatusReport, SyncHome, make_status_report
from fogline.sync._fleet import FleetStore
from fogline.sync._rollout_service import RolloutService

runner = CliRunner()
GOOD = {"error_rate": 0.0, "latency_p50_ms": 4.0, "latency_p99_ms": 9.0, "agreement_rate": 0.99}


def fogline(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def ok_json(*args: str) -> dict:
    code, out, err = fogline(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def home(tmp_path: Path, tiny_bundle: Path) -> Path:
    home = tmp_path / "home"
    ok_json("keys", "init", "--home", str(home), "--site-bins-bits", "4")
    for version in ("1", "2"):
        ok_json(
            "bundle", "publish", str(tiny_bundle), "--name", "m", "--version", version,
            "--region", "*", "--onnxruntime", "1.20", "--min-agent-version", "0.1",
            "--home", str(home),
        )  # fmt: skip
    for i in range(4):
        state = tmp_path / f"site-{i}"
        ok_json(
            "agent", "enroll", "--site", f"site-{i}", "--region", "eu", "--state-dir", str(state),
            "--catalogue-root", str(home / "catalogue/metadata/root.json"),
            "--director-root", str(home / "director/metadata/root.json"),
        )  # fmt: skip
        added = ok_json(
            "fleet", "add", f"site-{i}", "--region", "eu", "--fleet", "f",
            "--key", str(state / "site.json"), "--home", str(home),
        )  # fmt: skip
        assert added["new"]
    return home


def report_all(home: Path, tmp_path: Path, bundle: str) -> None:
    """Each site signs a report with its own key, through the service's python API."""
    store = FleetStore(f"sqlite:///{home / 'fleet.db'}")
    service = RolloutService(store, SyncHome(home))
    for i in range(4):
        identity = SiteIdentity.load(tmp_path / f"site-{i}")
        nonce = service.issue_nonce(identity.site)
        report = StatusReport(identity.site, nonce, bundle=bundle, phase="active", health=GOOD)
        service.receive_report(make_status_report(report, identity.signer()))
    store.close()


def test_a_rollout_runs_from_the_command_line_to_completion(home: Path, tmp_path: Path) -> None:
    report_all(home, tmp_path, "m@1")
    started = ok_json(
        "rollout", "start", "m:2", "--fleet", "f", "--canary", "25%", "--waves", "100%",
        "--bake", "0s", "--home", str(home),
    )  # fmt: skip
    assert started["state"] == "running"
    assert [row["sites"] for row in started["wave_table"]] == [1, 3]
    report_all(home, tmp_path, "m@2")
    for _ in range(4):
        ok_json("rollout", "tick", "--home", str(home))
        report_all(home, tmp_path, "m@2")
    status = ok_json("rollout", "status", "--home", str(home))
    assert status["state"] == "completed"
    code, out, _ = fogline("rollout", "status", "--watch", "--home", str(home))
    assert code == 0
    assert "completed" in out
    assert "error rate" in out
    sites = ok_json("fleet", "ls", "--home", str(home))["sites"]
    assert {(s["bundle"], s["desired"]) for s in sites} == {("m@2", "m@2")}
    code, out, _ = fogline("fleet", "ls", "--home", str(home))
    assert code == 0
    assert "fresh" in out


def test_pause_resume_abort_and_rollback_from_the_command_line(home: Path) -> None:
    ok_json("rollout", "start", "m:2", "--fleet", "f", "--home", str(home))
    assert ok_json("rollout", "pause", "--home", str(home))["state"] == "paused"
    assert ok_json("rollout", "resume", "--home", str(home))["state"] == "running"
    assert ok_json("rollout", "abort", "--home", str(home))["state"] == "aborted"
    back = ok_json("rollout", "rollback", "--to", "1", "--home", str(home))
    assert back["state"] == "rolled_back"
    assert back["rolled_back_to"] == "m@1"
    code, _, err = fogline("rollout", "pause", "--home", str(home))
    assert code == 2
    assert err.strip() == f"error: rollout {back['id']} is rolled back: cannot pause it"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--canary", "5x"], "error: --canary: '5x' is not a percentage such as 5%"),
        (["--canary", "150%"], "error: --canary: '150%' must lie between 0% and 100%"),
        (["--bake", "soon"], "error: --bake: 'soon' is not a duration such as 30s, 10m or 2h"),
        (["--waves", "50%,25%"], "error: waves [0.5, 0.25] must grow (they are cumulative)"),
        (["--waves", "5%,50%"], "error: the last wave must be 100%, not 50%"),
    ],
)
def test_a_bad_percentage_or_duration_is_one_line_and_exit_2(
    home: Path, args: list[str], line: str
) -> None:
    code, _, err = fogline("rollout", "start", "m:2", "--fleet", "f", *args, "--home", str(home))
    assert code == 2
    assert err.strip() == line


def test_an_unknown_bundle_is_one_line_and_exit_2(home: Path) -> None:
    code, _, err = fogline("rollout", "start", "m:9", "--fleet", "f", "--home", str(home))
    assert code == 2
    assert err.strip() == "error: m@9 is not released"


def test_attack_fleet_add_with_another_key_for_a_known_site_is_refused(
    home: Path, tmp_path: Path
) -> None:
    code, _, err = fogline(
        "fleet", "add", "site-0", "--region", "eu", "--fleet", "f",
        "--key", str(tmp_path / "site-1" / "site.json"), "--home", str(home),
    )  # fmt: skip
    assert code == 2
    assert "registered with another key" in err


def test_status_without_any_rollout_is_one_line(home: Path) -> None:
    code, _, err = fogline("rollout", "status", "--home", str(home))
    assert code == 2
    assert err.strip() == "error: no rollout yet"
