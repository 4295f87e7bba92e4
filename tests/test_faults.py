"""Fault injection with real processes: Mosquitto, two cloud workers and an agent, each its
own OS process. Every scenario must lose nothing and deliver no answer twice; items the
agent evicted by its configured bounds are the only ones without an answer, and they
must match its eviction counter."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline._broker import mosquitto_binary
from fogline._faults import FaultPlan, FaultReport, run_scenario

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="needs the mosquitto binary"),
]

QUIET = {"broker_restart_at": None, "worker_kill_at": None, "agent_kill_at": None}


def _run(tmp_path: Path, **changes: object) -> FaultReport:
    settings: dict[str, object] = {
        **QUIET,
        "items": 400,
        "rate_per_s": 150.0,
        "retry_initial_ms": 500,
        "retry_max_ms": 2000,
        "cloud_timeout_ms": 1000,
        "drain_timeout_s": 60.0,
    }
    settings.update(changes)
    report = run_scenario(FaultPlan(**settings), tmp_path)  # type: ignore[arg-type]
    assert report.lost == 0, report
    assert report.duplicates == 0, report
    assert report.failed == 0, report
    return report


def test_a_broker_stopped_and_restarted_mid_stream_loses_nothing(tmp_path: Path) -> None:
    report = _run(tmp_path, broker_restart_at=0.3, broker_down_s=3.0)
    assert report.offered >= 400
    assert report.answered == report.offered


def test_a_worker_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    report = _run(tmp_path, worker_kill_at=0.4, rate_per_s=300.0)
    assert report.answered == report.offered


def test_an_agent_killed_and_restarted_on_its_outbox_loses_nothing(tmp_path: Path) -> None:
    report = _run(tmp_path, agent_kill_at=0.5)
    assert report.answered == report.offered
    assert report.offered >= 400


def test_a_burst_ten_times_the_workers_capacity_is_pushed_back_and_then_served(
    tmp_path: Path,
) -> None:
    # Small queues and batches: the burst overflows them and the workers answer "busy".
    report = _run(
        tmp_path,
        items=1500,
        rate_per_s=0.0,
        worker_queue_items=8,
        worker_max_batch=2,
        retry_initial_ms=300,
    )
    assert report.answered == report.offered
    assert report.busy_replies > 0
    assert report.resends > 0


def test_items_evicted_by_the_outbox_bound_are_exactly_the_counted_evictions(
    tmp_path: Path,
) -> None:
    report = _run(
        tmp_path,
        items=500,
        rate_per_s=250.0,
        broker_restart_at=0.1,
        broker_down_s=3.0,
        outbox_max_items=100,
    )
    assert report.evicted > 0
    assert report.evicted == report.evicted_counter
    assert report.answered + report.evicted == report.offered


def test_the_application_knows_the_outcomes_an_earlier_process_kept(tmp_path: Path) -> None:
    from fogline._faults import _kept_tags

    (tmp_path / "outcomes-0-11.jsonl").write_text(
        '{"tag": "0:1", "kind": "answer", "t": 1.0}\n{"tag": "0:2", "kind": "failed", "t": 2.0}\n'
        '{"tag": "0:3", "ki'  # cut short by SIGKILL: not kept, so it is logged again
    )
    (tmp_path / "outcomes-1-12.jsonl").write_text('{"tag": "1:7", "kind": "answer", "t": 3.0}\n')
    (tmp_path / "offered-0-11.log").write_text("0:4 1.0\n")
    assert _kept_tags(tmp_path) == {"0:1", "0:2", "1:7"}
