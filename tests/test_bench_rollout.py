"""``fogline bench rollout`` in its quickest form: a few light sites, three waves, to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogline", "bench", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_rollout_converges_a_small_light_fleet_in_three_waves() -> None:
    out = bench("--sites", "40", "--light", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["state"] == "completed"
    assert result["waves"] == 3
    assert result["converged"] == result["sites"] == 40
    assert result["reports"] == 80
    assert result["reports_per_s"] > 0
    assert result["store_bytes"] > 0
    assert result["seconds_to_converge"] > 0


@pytest.mark.integration
def test_bench_rollout_runs_against_postgresql() -> None:
    url = os.environ.get("FOGLINE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("FOGLINE_TEST_POSTGRES_URL is not set")
    out = bench("--sites", "20", "--light", "--json", "--store", url)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["store"] == "postgresql"
    assert result["converged"] == 20


def test_bench_rollout_without_light_says_what_to_add() -> None:
    out = bench("--sites", "5")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: only light simulated sites are built so far: add --light"
