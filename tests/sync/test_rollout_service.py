"""The rollout service over a real SQLite fleet store and a real sync home (python-tuf
metadata, Ed25519 keys), with real signed status reports."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from fogline.sync import (
    Platform,
    ReplayedReportError,
    ReportError,
    RolloutError,
    StatusReport,
    SyncHome,
    generate_key,
    make_status_report,
)
from fogline.sync._fleet import FleetStore, StaleRolloutError
from fogline.sync._rollout import RolloutPolicy
from fogline.sync._rollout_service import RolloutService

GOOD = {"error_rate": 0.01, "latency_p50_ms": 5.0, "latency_p99_ms": 20.0, "agreement_rate": 0.97}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, tmp: Path, bundle: Path, sites: int = 10) -> None:
        self.home = SyncHome.init(tmp / "home", site_bins_bits=4)
        for version in ("1", "2"):
            self.home.publish(
                bundle,
                name="m",
                version=version,
                platform=Platform("1.20"),
                regions=("*",),
                min_agent_version="0.1",
            )
        self.clock = Clock()
        self.nudged: list[tuple[str, str | None]] = []
        self.store = FleetStore(f"sqlite:///{tmp / 'fleet.db'}")
        self.service = RolloutService(
            self.store,
            self.home,
            on_assigned=lambda s, b: self.nudged.append((s, b)),
            clock=self.clock,
        )
        self.signers: dict[str, CryptoSigner] = {}
        for i in range(sites):
            name = f"site-{i}"
            self.signers[name] = generate_key()
            self.service.register_site(name, "eu", "fleet", self.signers[name].public_key)

    def report(self, site: str, bundle: str | None = "m@1", **kwargs: object) -> bytes:
        nonce = self.service.issue_nonce(site)
        values: dict[str, object] = {"phase": "active", "health": GOOD, **kwargs}
        report = StatusReport(site=site, nonce=nonce, bundle=bundle, **values)  # type: ignore[arg-type]
        return make_status_report(report, self.signers[site])

    def all_report(self, bundle: str, sites: list[str] | None = None, **kwargs: object) -> None:
        for site in sites if sites is not None else self.signers:
            self.service.receive_report(self.report(site, bundle, **kwargs))

    def desired(self, site: str) -> str | None:
        release = self.home.director().desired(site)
        return None if release is None else release.id


@pytest.fixture
def world(tmp_path: Path, tiny_bundle: Path) -> World:
    return World(tmp_path, tiny_bundle)


POLICY = RolloutPolicy(canary=0.1, waves=(0.5, 1.0), bake_s=60.0, site_timeout_s=600.0)


def test_a_rollout_converges_wave_by_wave_through_the_director(world: World) -> None:
    world.all_report("m@1")
    status = world.service.start("m:2", "fleet", POLICY)
    assert status["state"] == "running"
    assert status["baseline"]["error_rate"] == pytest.approx(0.01)
    canary = [s for s, b in world.nudged if b == "m@2"]
    assert len(canary) == 1
    assert world.desired(canary[0]) == "m@2"
    for _ in range(10):
        world.clock.now += 61
        assigned = [s for s, b in world.nudged if b == "m@2"]
        world.all_report("m@2", assigned)
        world.all_report("m@1", [s for s in world.signers if s not in assigned])
        world.service.tick()
    status = world.service.status()
    assert status["state"] == "completed"
    assert {world.desired(s) for s in world.signers} == {"m@2"}
    assert sum(row["active"] for row in status["wave_table"]) == 10
    kinds = [e["kind"] for e in world.store.events(status["id"], limit=1000)]
    assert kinds.count("wave_started") == 3
    assert kinds[-1] == "completed"


def test_rollback_points_the_sites_back_and_nudges_them(world: World) -> None:
    world.all_report("m@1")
    world.service.start("m@2", "fleet", POLICY)
    world.nudged.clear()
    status = world.service.rollback()
    assert status["state"] == "rolled_back"
    assert [b for _, b in world.nudged] == ["m@1"]
    assert {world.desired(s) for s, _ in world.nudged} == {"m@1"}


def test_an_unhealthy_canary_with_auto_rollback_rolls_back_on_tick(world: World) -> None:
    world.all_report("m@1")
    policy = RolloutPolicy(canary=0.1, waves=(1.0,), bake_s=0.0, auto_rollback=True)
    world.service.start("m@2", "fleet", policy)
    canary = [s for s, b in world.nudged if b == "m@2"]
    world.clock.now += 1
    world.all_report("m@2", canary, health={**GOOD, "error_rate": 0.3})
    assert world.service.tick()[0]["state"] == "rolled_back"
    assert world.desired(canary[0]) == "m@1"


def test_operator_steps_refuse_what_the_state_does_not_allow(world: World) -> None:
    world.service.start("m@2", "fleet", POLICY)
    with pytest.raises(RolloutError, match="already has rollout"):
        world.service.start("m@2", "fleet", POLICY)
    assert world.service.pause()["state"] == "paused"
    assert world.service.resume()["state"] == "running"
    assert world.service.abort()["state"] == "aborted"
    with pytest.raises(RolloutError, match="aborted: cannot resume"):
        world.service.resume()
    assert world.service.rollback(to="1")["rolled_back_to"] == "m@1"


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (lambda s: s.start("m@9", "fleet"), "m@9 is not released"),
        (lambda s: s.start("m@2", "nowhere"), "no registered sites"),
        (lambda s: s.rollback(to="9"), "no rollout"),
    ],
)
def test_an_unknown_bundle_fleet_or_rollout_is_a_clear_error(
    world: World, start: Callable[[RolloutService], object], message: str
) -> None:
    with pytest.raises(RolloutError, match=message):
        start(world.service)


def test_attack_replayed_status_report_is_refused(world: World) -> None:
    data = world.report("site-0")
    world.service.receive_report(data)
    with pytest.raises(ReplayedReportError):
        world.service.receive_report(data)


def test_attack_report_signed_by_another_sites_key_is_refused(world: World) -> None:
    nonce = world.service.issue_nonce("site-0")
    forged = make_status_report(
        StatusReport(site="site-0", nonce=nonce, bundle="m@1"), world.signers["site-1"]
    )
    with pytest.raises(ReportError, match="not signed by its key"):
        world.service.receive_report(forged)
    assert world.store.site("site-0").last_seen is None  # type: ignore[union-attr]
    # the nonce was not used up by the forgery
    world.service.receive_report(
        make_status_report(
            StatusReport(site="site-0", nonce=nonce, bundle="m@1"), world.signers["site-0"]
        )
    )


def test_attack_report_of_an_unregistered_site_is_refused(world: World) -> None:
    stranger = generate_key()
    data = make_status_report(StatusReport(site="stranger", nonce="n" * 32), stranger)
    with pytest.raises(ReportError, match="unknown site"):
        world.service.receive_report(data)
    with pytest.raises(RolloutError, match="not registered"):
        world.service.issue_nonce("stranger")


def test_nonces_are_shared_by_every_service_over_one_store(world: World) -> None:
    other = RolloutService(world.store, world.home, clock=world.clock)
    data = world.report("site-0")  # nonce issued by the first service
    other.receive_report(data)
    with pytest.raises(ReplayedReportError):
        world.service.receive_report(data)


def test_a_tick_planned_before_an_operators_rollback_never_writes_the_director(
    world: World,
) -> None:
    """The race of a serving cloud's tick with `fogline rollout rollback`: the tick loaded
    the rollout, then the operator rolled it back. The tick's next wave is refused before
    anything is signed, so every site stays pointed back."""
    world.all_report("m@1")
    policy = RolloutPolicy(canary=0.1, waves=(1.0,), bake_s=0.0)
    world.service.start("m@2", "fleet", policy)
    canary = [s for s, b in world.nudged if b == "m@2"]
    world.clock.now += 1
    world.all_report("m@2", canary)
    rollout, version = world.store.load_rollout(world.service.status()["id"]) or (None, 0)
    assert rollout is not None
    before = rollout.copy()
    stale_step = rollout.tick(world.clock.now, world.service._observations("fleet"))
    assert any(a.kind == "assign" for a in stale_step)  # it would assign the last wave
    world.service.rollback()
    with pytest.raises(StaleRolloutError):
        world.service._apply(rollout, version, before, stale_step, world.clock.now)
    assert {world.desired(s) for s in world.signers} <= {"m@1", None}
    assert world.service.status()["state"] == "rolled_back"


def test_an_operators_abort_waits_out_a_tick_that_holds_the_home(world: World) -> None:
    """Another process signing (the cloud's tick holds the home's lock) does not make an
    abort fail: it is planned again until the lock is free, and takes effect."""
    world.all_report("m@1")
    world.service.start("m@2", "fleet", POLICY)
    held = threading.Event()
    release = threading.Event()

    def signer() -> None:
        with world.home.lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=signer)
    thread.start()
    held.wait(10)
    threading.Timer(0.3, release.set).start()
    try:
        status = world.service.abort()
    finally:
        release.set()
        thread.join(10)
    assert status["state"] == "aborted"
