"""``fogline demo``: the whole data path in one command, its summary and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fogline._demo import run_demo
from tests.conftest import Broker

pytestmark = pytest.mark.integration

FOGLINE = str(Path(sys.executable).with_name("fogline"))
KEYS = {
    "samples",
    "dropped_at_edge",
    "answered_at_edge",
    "forwarded",
    "results",
    "accuracy_hybrid",
    "accuracy_cloud_only",
    "bytes_raw",
    "bytes_sent",
    "latency_ms",
    "elapsed_s",
}


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FOGLINE, "demo", "--json", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_demo_answers_every_frame_and_prints_one_json_object_with_the_summary() -> None:
    proc = _demo("--samples", "1000", "--fps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) >= KEYS
    assert set(out["latency_ms"]) >= {"p50", "p99"}
    assert out["samples"] == 1000
    assert out["dropped_at_edge"] + out["answered_at_edge"] + out["results"] == 1000
    assert out["results"] == out["forwarded"] > 0
    assert out["dropped_at_edge"] > out["answered_at_edge"] > 0  # most frames hold no digit
    assert out["failed"] == 0
    assert 0 < out["bytes_sent"] < out["bytes_raw"]
    assert 0.9 < out["accuracy_hybrid"] <= 1.0
    assert 0.9 < out["accuracy_cloud_only"] <= 1.0
    assert out["broker"].startswith("embedded")


def test_the_demo_runs_on_an_external_broker_with_a_shared_subscription(broker: Broker) -> None:
    result = run_demo(samples=200, sites=2, broker_url=broker.url, progress=False)
    assert result.failed == 0, result.failures
    assert result.answered == result.samples == 200
    assert result.broker == f"external {broker.url}"


def test_an_unreachable_broker_is_a_one_line_error_and_exit_code_2() -> None:
    proc = _demo("--samples", "10", "--broker", "mqtt://127.0.0.1:1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: no connection to broker 127.0.0.1:1 within 10 s: [Errno 111] Connection refused"
    ]


def test_items_answered_degraded_first_count_only_with_the_clouds_final_answer() -> None:
    # Callers wait 1 ms for the cloud, less than any round trip through the embedded
    # broker: forwarded items get the edge's degraded answer first, and the cloud's
    # answer through on_answer. 1,200 frames flat out forward several.
    result = run_demo(samples=1200, fps=0, progress=False, cloud_timeout_ms=1)
    assert result.forwarded >= 3
    assert result.degraded > 0
    assert result.failed == 0, result.failures
    assert result.results == result.forwarded
    assert result.answered == result.samples == 1200
