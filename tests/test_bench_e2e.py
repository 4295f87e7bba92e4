"""``fogline bench e2e`` on a real Mosquitto and a real worker process, briefly.

Only the shape of the result and that every sample was answered by the cloud are checked:
the latencies depend on the machine and are never asserted.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fogline._bench import app

pytestmark = pytest.mark.integration


def test_bench_e2e_answers_every_sample_and_reports_both_latencies() -> None:
    args = ["e2e", "--rate", "200", "--seconds", "1", "--warmup-s", "0.2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["samples"] == 200
    assert out["answered_by_cloud"] == 200
    assert out["failed"] == 0
    assert out["max_queue_delay_ms"] == 0.0
    assert out["warmup_s"] == 0.2
    for key in ("latency_ms", "caller_latency_ms"):
        assert set(out[key]) == {"p50", "p99", "max"}
        assert 0 < out[key]["p50"] <= out[key]["p99"] <= out[key]["max"]
    # The caller's answer comes after its arrival (the outbox delete is in between).
    assert out["caller_latency_ms"]["p50"] >= out["latency_ms"]["p50"]
    assert out["bytes_per_forwarded"] > 0
    assert out["reduction_vs_raw"] > 1
    assert out["shed"] == 0
    assert out["host_cpu_ms"] > 0
    assert out["host_steal_pct"] is None or 0 <= out["host_steal_pct"] <= 100
    cpu = out["cpu_ms_per_item"]
    assert set(cpu) == {"agent", "workers", "broker", "total"}
    if out["broker"] == "mosquitto":  # a private broker process: every part is measured
        assert cpu["agent"] > 0
        assert cpu["workers"] > 0
        assert cpu["total"] == pytest.approx(
            cpu["agent"] + cpu["workers"] + cpu["broker"], abs=0.01
        )
