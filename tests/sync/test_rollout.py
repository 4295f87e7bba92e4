"""The rollout planner, pure: a fake clock (plain numbers) and made-up site reports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest

from fogline.sync import RolloutError
from fogline.sync._rollout import (
    Assign,
    Observation,
    Rollout,
    RolloutPolicy,
    Tolerance,
    Unassign,
    cohort_order,
    judge,
    plan_waves,
)

NEW, OLD = "model@2", "model@1"
GOOD = {"error_rate": 0.01, "latency_p50_ms": 10.0, "latency_p99_ms": 30.0, "agreement_rate": 0.95}
BAD = {**GOOD, "error_rate": 0.2}


def sites(n: int) -> dict[str, str | None]:
    return {f"site-{i:03d}": OLD for i in range(n)}


def start(n: int = 100, now: float = 1000.0, **policy: object) -> tuple[Rollout, list[object]]:
    values: dict[str, object] = {"canary": 0.05, "waves": (0.25, 1.0), "bake_s": 60.0}
    values.update(policy)
    return Rollout.start("r1", NEW, "f", RolloutPolicy(**values), sites(n), GOOD, now)  # type: ignore[arg-type]


def assigned(actions: Iterable[object], why: str = "wave") -> set[str]:
    return {s for a in actions if isinstance(a, Assign) and a.why == why for s in a.sites}


def reports(
    names: Iterable[str],
    now: float,
    *,
    bundle: str = NEW,
    phase: str = "active",
    health: Mapping[str, float] = GOOD,
    error: str | None = None,
) -> dict[str, Observation]:
    return {
        s: Observation(s, now, bundle=bundle, phase=phase, health=health, error=error)
        for s in names
    }


def run_wave(r: Rollout, now: float, obs: dict[str, Observation]) -> list[object]:
    """Every assigned site reports active and healthy at ``now``; tick at ``now``."""
    obs.update(reports([s.site for s in r.assigned()], now))
    return list(r.tick(now, obs))


def test_cohorts_are_deterministic_and_a_site_keeps_its_wave() -> None:
    a, _ = start(200)
    b, _ = start(200, now=5.0)
    assert {s: p.wave for s, p in a.sites.items()} == {s: p.wave for s, p in b.sites.items()}
    assert cohort_order("model@2/f", ["x", "y", "z"]) == cohort_order("model@2/f", ["z", "y", "x"])
    # another bundle draws other canaries
    c = Rollout.start("r2", "model@3", "f", a.policy, sites(200), GOOD, 0.0)[0]
    canaries = {s for s, p in a.sites.items() if p.wave == 0}
    assert canaries != {s for s, p in c.sites.items() if p.wave == 0}


def test_waves_are_cumulative_fractions_with_a_floor_of_min_sites() -> None:
    policy = RolloutPolicy(canary=0.05, waves=(0.05, 0.25, 1.0))
    assert plan_waves(policy, 100) == [5, 25, 100]
    assert plan_waves(policy, 10) == [1, 3, 10]
    assert plan_waves(RolloutPolicy(canary=0.05, waves=(1.0,), min_sites=4), 10) == [4, 10]
    assert plan_waves(RolloutPolicy(min_sites=50), 3) == [3]


def test_the_first_wave_is_the_canary_only() -> None:
    r, actions = start(100)
    assert len(assigned(actions)) == 5
    assert all(p.assigned_at is None for p in r.sites.values() if p.wave > 0)


def test_a_wave_advances_only_after_the_bake_with_healthy_active_reports() -> None:
    r, actions = start(100)
    canary = assigned(actions)
    obs: dict[str, Observation] = {}
    # downloading is not done
    obs.update(reports(canary, 1010.0, phase="downloading", bundle=OLD))
    assert not assigned(r.tick(1010.0, obs))
    assert {r.sites[s].state for s in canary} == {"downloading"}
    # all active: the bake starts, and the wave waits for it
    run_wave(r, 1020.0, obs)
    assert r.baking_since == 1020.0
    assert r.wave == 0
    assert not assigned(run_wave(r, 1079.0, obs))
    second = assigned(run_wave(r, 1080.0, obs))
    assert r.wave == 1
    assert len(second) == 20
    assert not second & canary
    # the last wave, then completed
    run_wave(r, 1100.0, obs)
    assert len(assigned(run_wave(r, 1160.0, obs))) == 75
    run_wave(r, 1170.0, obs)
    run_wave(r, 1230.0, obs)
    assert r.state == "completed"
    assert {p.state for p in r.sites.values()} == {"active"}


def test_a_site_that_stops_being_active_restarts_the_bake() -> None:
    r, actions = start(100)
    obs: dict[str, Observation] = {}
    run_wave(r, 1010.0, obs)
    one = sorted(assigned(actions))[0]
    obs[one] = Observation(one, 1030.0, bundle=OLD, phase="downloading")
    r.tick(1030.0, obs)
    assert r.baking_since is None
    assert not assigned(run_wave(r, 1070.0, obs))  # bake from 1070 again
    assert assigned(run_wave(r, 1130.0, obs))


def test_a_failing_health_gate_pauses_the_rollout() -> None:
    r, actions = start(100)
    canary = assigned(actions)
    r.tick(1010.0, reports(canary, 1010.0))  # all active: the bake (60 s) starts
    obs = reports(canary, 1045.0, health=BAD)  # its second half: judged at once
    r.tick(1045.0, obs)
    assert r.state == "paused"
    assert r.reason is not None
    assert "error_rate" in r.reason
    assert all(p.assigned_at is None for p in r.sites.values() if p.wave > 0)


def test_a_failing_health_gate_with_auto_rollback_points_the_wave_back() -> None:
    r, actions = start(100, auto_rollback=True)
    canary = assigned(actions)
    latency = {**GOOD, "latency_p99_ms": 90.0}
    r.tick(1010.0, reports(canary, 1010.0))
    out = r.tick(1041.0, reports(canary, 1041.0, health=latency))
    assert r.state == "rolled_back"
    assert assigned(out, "rollback") == canary
    assert [a.bundle for a in out if isinstance(a, Assign)] == [OLD]
    assert {r.sites[s].state for s in canary} == {"rolled_back"}


def test_the_gate_ignores_reports_from_the_first_half_of_the_bake() -> None:
    """What a site reports just after its swap also covers the swap (download, warm-up):
    bad figures then do not stop the wave; the same figures later in the bake do."""
    r, actions = start(100)
    canary = assigned(actions)
    r.tick(1010.0, reports(canary, 1010.0, health=BAD))  # the bake starts at 1010
    r.tick(1030.0, reports(canary, 1030.0, health=BAD))  # first half: not judged
    assert r.state == "running"
    r.tick(1050.0, reports(canary, 1050.0))  # second half, healthy
    assert r.state == "running"
    assert len(assigned(r.tick(1071.0, reports(canary, 1070.0)))) == 20  # baked: next wave
    r2, actions2 = start(100)
    canary2 = assigned(actions2)
    r2.tick(1010.0, reports(canary2, 1010.0))
    r2.tick(1041.0, reports(canary2, 1041.0, health=BAD))
    assert r2.state == "paused"


def test_the_gate_compares_each_figure_with_its_tolerance() -> None:
    tol = Tolerance(error_rate=0.01, latency_ratio=1.5, latency_ms=0.0, agreement_rate=0.05)
    base = {"error_rate": 0.01, "latency_p99_ms": 20.0, "agreement_rate": 0.9}
    assert (
        judge(base, {"error_rate": 0.02, "latency_p99_ms": 30.0, "agreement_rate": 0.85}, tol) == []
    )
    problems = judge(base, {"error_rate": 0.03, "latency_p99_ms": 31.0, "agreement_rate": 0.8}, tol)
    assert [p.split()[0] for p in problems] == ["error_rate", "latency_p99_ms", "agreement_rate"]
    assert judge({}, {"error_rate": 1.0}, tol) == []


def test_failures_past_the_threshold_pause_and_with_auto_rollback_roll_back() -> None:
    r, actions = start(100, max_failure_rate=0.2)
    canary = sorted(assigned(actions))
    obs = reports(canary[1:], 1010.0)
    obs.update(reports(canary[:1], 1010.0, phase="failed", bundle=OLD, error="disk full"))
    r.tick(1010.0, obs)  # 1 of 5 = 20 %: at the threshold, not over it
    assert r.state == "running"
    assert r.sites[canary[0]].reason == "the site reports: disk full"
    obs.update(reports(canary[1:2], 1011.0, phase="failed", bundle=OLD))
    r.tick(1011.0, obs)
    assert r.state == "paused"
    assert "2 of 5" in (r.reason or "")

    r, actions = start(100, max_failure_rate=0.0, auto_rollback=True)
    canary = sorted(assigned(actions))
    obs = reports(canary[:1], 1010.0, phase="failed", bundle=OLD)
    out = r.tick(1010.0, obs)
    assert r.state == "rolled_back"
    assert assigned(out, "rollback") == set(canary)


def test_a_site_silent_past_the_site_timeout_counts_as_failed() -> None:
    r, actions = start(100, site_timeout_s=300.0, max_failure_rate=1.0)
    canary = sorted(assigned(actions))
    obs = reports(canary[1:], 1010.0)
    r.tick(1299.0, obs)
    assert r.sites[canary[0]].state == "pending"
    r.tick(1300.0, obs)
    assert r.sites[canary[0]].state == "failed"
    assert "site timeout" in (r.sites[canary[0]].reason or "")
    # an active site that stops reporting fails too
    r.tick(1310.0, obs)
    assert {r.sites[s].state for s in canary[1:]} == {"failed"}


def test_a_site_stuck_downloading_fails_at_the_site_timeout() -> None:
    r, actions = start(100, site_timeout_s=300.0, max_failure_rate=1.0)
    canary = sorted(assigned(actions))
    obs = reports(canary, 1010.0, bundle=OLD, phase="downloading")
    for t in (1100.0, 1200.0, 1299.0):
        obs.update(reports(canary, t, bundle=OLD, phase="downloading"))
        r.tick(t, obs)
        assert {r.sites[s].state for s in canary} == {"downloading"}
    r.tick(1300.0, obs)
    assert {r.sites[s].state for s in canary} == {"failed"}


def test_abort_during_download_points_the_sites_not_yet_active_back() -> None:
    r, actions = start(100, max_failure_rate=1.0)
    canary = sorted(assigned(actions))
    obs = reports(canary[:2], 1010.0)
    obs.update(reports(canary[2:], 1010.0, bundle=OLD, phase="downloading"))
    r.tick(1010.0, obs)
    out = r.abort(1020.0)
    assert r.state == "aborted"
    assert assigned(out, "abort") == set(canary[2:])
    assert {r.sites[s].state for s in canary[:2]} == {"active"}
    assert r.tick(1100.0, obs) == []  # nothing more is assigned
    with pytest.raises(RolloutError, match="aborted"):
        r.resume(1100.0)


@pytest.mark.parametrize(
    "stage", ["canary", "downloading", "second wave", "paused", "completed", "aborted"]
)
def test_rollback_at_every_stage_points_every_assigned_site_back(stage: str) -> None:
    r, actions = start(20, canary=0.1, waves=(0.5, 1.0), bake_s=0.0, max_failure_rate=1.0)
    obs: dict[str, Observation] = {}
    if stage == "downloading":
        obs.update(reports(assigned(actions), 1001.0, bundle=OLD, phase="downloading"))
        r.tick(1001.0, obs)
    elif stage == "second wave":
        run_wave(r, 1001.0, obs)
    elif stage == "paused":
        r.pause(1001.0)
    elif stage == "completed":
        for t in range(1001, 1010):
            run_wave(r, float(t), obs)
        assert r.state == "completed"
    elif stage == "aborted":
        run_wave(r, 1001.0, obs)
        r.abort(1002.0)
    touched = {s.site for s in r.assigned()}
    out = r.rollback(1050.0)
    assert r.state == "rolled_back"
    back = assigned(out, "rollback")
    if stage == "aborted":
        back |= {s.site for s in r.assigned() if s.state == "rolled_back"}
    assert back == touched
    assert {s.state for s in r.assigned()} == {"rolled_back"}
    with pytest.raises(RolloutError, match="rolled back"):
        r.rollback(1060.0)


def test_rollback_to_a_version_points_every_site_there() -> None:
    r, actions = start(20, canary=0.1)
    out = r.rollback(1010.0, to="model@0")
    assert [(a.bundle, set(a.sites)) for a in out if isinstance(a, Assign)] == [
        ("model@0", assigned(actions))
    ]


def test_sites_with_no_previous_bundle_are_unassigned_on_rollback() -> None:
    fleet: dict[str, str | None] = {"a": None, "b": OLD}
    r, _ = Rollout.start("r", NEW, "f", RolloutPolicy(canary=0.0, waves=(1.0,)), fleet, {}, 0.0)
    out = r.rollback(1.0)
    assert [a.sites for a in out if isinstance(a, Unassign)] == [("a",)]
    assert [a.sites for a in out if isinstance(a, Assign)] == [("b",)]


def test_pause_holds_the_waves_and_resume_excuses_the_failures_so_far() -> None:
    r, actions = start(100, max_failure_rate=0.0)
    canary = sorted(assigned(actions))
    obs = reports(canary[1:], 1010.0)
    obs.update(reports(canary[:1], 1010.0, phase="failed", bundle=OLD))
    r.tick(1010.0, obs)
    assert r.state == "paused"
    assert not assigned(run_wave(r, 2000.0, obs))  # paused: nothing starts
    r.resume(2001.0)
    assert r.state == "running"
    assert r.sites[canary[0]].excused
    r.tick(2001.0, obs)
    assert r.state == "running"
    assert not assigned(r.tick(2061.0, obs))  # baked, but no report since it began
    assert len(assigned(r.tick(2062.0, reports(canary[1:], 2050.0)))) == 20
    with pytest.raises(RolloutError, match="running"):
        r.resume(2062.0)
    r.pause(2062.0)
    with pytest.raises(RolloutError, match="paused"):
        r.pause(2063.0)


def test_a_report_from_before_the_assignment_does_not_count() -> None:
    r, actions = start(100)
    canary = assigned(actions)
    r.tick(1010.0, reports(canary, 999.0))
    assert {r.sites[s].state for s in canary} == {"pending"}


def test_the_state_survives_a_round_trip_through_its_persisted_form() -> None:
    r, _actions = start(100)
    run_wave(r, 1010.0, {})
    again = Rollout.from_header(
        r.header(), [type(p).from_dict(p.to_dict()) for p in r.sites.values()]
    )
    assert again == r


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"waves": (0.5,)}, "last wave must be 100%"),
        ({"waves": (0.5, 0.25, 1.0)}, "must grow"),
        ({"canary": 1.5}, "canary"),
        ({"max_failure_rate": -0.1}, "max failure rate"),
        ({"site_timeout_s": 0}, "site timeout"),
        ({"min_sites": 0}, "min_sites"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(policy: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RolloutPolicy(**policy)  # type: ignore[arg-type]


def test_a_fleet_without_sites_cannot_be_rolled_out_to() -> None:
    with pytest.raises(RolloutError, match="no sites"):
        Rollout.start("r", NEW, "f", RolloutPolicy(), {}, {}, 0.0)
