"""The updater's pure parts: what to do next, the phases and backoff of an update, the
health of a report window (fake clock), and the on-disk record of what runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fogline.edge_agent._health import HealthWindow
from fogline.edge_agent._installed import (
    Installed,
    InstalledBundle,
    choose_bundle,
    prune_bundles,
    read_installed,
    update_lock,
    write_installed,
)
from fogline.edge_agent._update_plan import BundleRef, UpdateState, next_action
from fogline.edge_agent.errors import UpdateLockedError

A1 = BundleRef("tiny@1", "a" * 64)
A2 = BundleRef("tiny@2", "b" * 64)


def test_next_action_installs_only_what_differs_from_what_runs() -> None:
    assert next_action(A1, None) == "idle"
    assert next_action(None, None) == "idle"
    assert next_action(A1, A1) == "active"
    assert next_action(A1, A2) == "install"
    assert next_action(None, A1) == "install"
    # Same name and version but another manifest: another release, installed.
    assert next_action(A1, BundleRef("tiny@1", "c" * 64)) == "install"


def test_an_install_goes_downloading_verified_active_and_clears_desired() -> None:
    s = UpdateState(poll_s=300, report_s=60)
    assert s.begin("tiny@2")
    assert s.phase == "downloading"
    assert s.desired == "tiny@2"
    assert s.verified()
    assert s.phase == "verified"
    assert s.outcome("installed", 10.0, desired="tiny@2")
    assert (s.phase, s.desired, s.stale, s.error) == ("active", None, False, None)
    assert s.next_attempt_at == 310.0


def test_transport_failures_back_off_doubling_up_to_the_poll_and_keep_serving() -> None:
    s = UpdateState(poll_s=10, report_s=60, phase="active")
    delays = []
    for _ in range(6):
        s.outcome("transport", 100.0, error="FetchError: down")
        delays.append(s.next_attempt_at - 100.0)
    assert delays == [1, 2, 4, 8, 10, 10]
    assert s.phase == "active"
    assert s.error == "FetchError: down"
    s.nudge(100.0)  # a nudge does not break a backoff
    assert s.next_attempt_at == 110.0
    s.outcome("active", 200.0)
    assert s.failures_in_a_row == 0
    assert s.error is None


def test_a_transport_failure_mid_install_is_failed() -> None:
    s = UpdateState(poll_s=10, report_s=60, phase="active")
    s.begin("tiny@2")
    assert s.outcome("transport", 0.0, error="FetchError: cut")
    assert s.phase == "failed"


def test_expiry_keeps_the_phase_marks_stale_and_retries_at_the_next_poll() -> None:
    s = UpdateState(poll_s=30, report_s=60, phase="active")
    assert s.outcome("expired", 5.0, error="ExpiredError: director timestamp")
    assert (s.phase, s.stale) == ("active", True)
    assert s.next_attempt_at == 35.0
    assert not s.outcome("expired", 35.0, error="again")  # no change: no extra report
    assert s.outcome("active", 65.0)
    assert not s.stale


def test_a_refusal_fails_with_its_reason_and_an_abort_looks_again_at_once() -> None:
    s = UpdateState(poll_s=30, report_s=60, phase="active")
    assert s.outcome("refused", 1.0, desired="tiny@2", error="TamperedError: x")
    assert (s.phase, s.desired, s.error) == ("failed", "tiny@2", "TamperedError: x")
    s.outcome("aborted", 2.0)
    assert s.next_attempt_at == 2.0


def test_reports_fall_due_every_report_period() -> None:
    s = UpdateState(poll_s=300, report_s=60)
    assert s.report_due(0.0)
    s.reported(0.0)
    s.next_attempt_at = 300.0
    assert not s.report_due(59.0)
    assert s.report_due(60.0)
    assert s.wait_s(10.0) == 50.0


def test_bad_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="poll_s"):
        UpdateState(poll_s=0, report_s=1)


def test_health_window_counts_rates_percentiles_and_agreement_with_a_fake_clock() -> None:
    failed = [0.0]
    h = HealthWindow(100.0, lambda: failed[0])
    for ms in range(1, 101):  # 1 … 100 ms
        h.observe("cloud", ms / 1000.0)
    h.observe("edge", 0.002, 100)
    failed[0] = 4
    for edge, cloud in ((1, 1), (2, 2), (3, 0), (None, 1)):
        h.compare(edge, cloud)
    got = h.take(110.0)
    assert got["items"] == 200
    assert got["items_per_s"] == 20.0
    assert got["error_rate"] == pytest.approx(4 / 200)
    assert got["latency_p50_ms"] == pytest.approx(2.0, rel=0.05)
    assert got["latency_p99_ms"] == pytest.approx(98.0, rel=0.05)
    assert got["agreement_rate"] == pytest.approx(2 / 3)
    assert got["compared"] == 3
    # A new window from there: nothing since.
    failed[0] = 5
    again = h.take(120.0)
    assert again["items"] == 0
    assert again["failed"] == 1
    assert again["agreement_rate"] == 1.0
    assert again["latency_p50_ms"] == 0.0


def _bundle(root: Path, version: str, body: bytes) -> InstalledBundle:
    path = root / "bundles" / "tiny" / version
    path.mkdir(parents=True)
    (path / "manifest.json").write_bytes(b"{}" + body)
    (path / "edge.onnx").write_bytes(body)
    return InstalledBundle(
        "tiny",
        version,
        int(version),
        hashlib.sha256(b"{}" + body).hexdigest(),
        {"edge.onnx": hashlib.sha256(body).hexdigest()},
        path,
    )


def test_a_damaged_current_bundle_falls_back_to_the_previous(tmp_path: Path) -> None:
    one, two = _bundle(tmp_path, "1", b"one"), _bundle(tmp_path, "2", b"two")
    installed = Installed().after_swap(one).after_swap(two)
    assert (installed.current, installed.previous) == (two, one)
    write_installed(tmp_path, installed)
    assert read_installed(tmp_path) == installed
    assert choose_bundle(tmp_path) == two
    (two.path / "edge.onnx").write_bytes(b"tw0")
    assert choose_bundle(tmp_path) == one
    (one.path / "edge.onnx").unlink()
    assert choose_bundle(tmp_path) is None
    (tmp_path / "current.json").write_text("{not json")
    assert read_installed(tmp_path) == Installed()


def test_prune_keeps_the_current_and_previous_and_removes_staging(tmp_path: Path) -> None:
    bundles = [_bundle(tmp_path, v, v.encode()) for v in ("1", "2", "3")]
    staging = tmp_path / "bundles" / "tiny" / ".partial-4-xyz"
    staging.mkdir()
    removed = prune_bundles(tmp_path, {bundles[1].path, bundles[2].path})
    assert sorted(p.name for p in removed) == [".partial-4-xyz", "1"]
    assert sorted(p.name for p in (tmp_path / "bundles" / "tiny").iterdir()) == ["2", "3"]


def test_one_updater_at_a_time_per_site(tmp_path: Path) -> None:
    with (
        update_lock(tmp_path),
        pytest.raises(UpdateLockedError, match="another updater"),
        update_lock(tmp_path),
    ):
        pass
    with update_lock(tmp_path):  # released: the next one gets it
        pass
