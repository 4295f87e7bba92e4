"""``fogline bench rollout`` in its quickest forms: a few light sites, and a few real agents
behind a real cloud, three waves, to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require_mosquitto


def bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogline", "bench", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
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


def test_bench_rollout_swaps_real_agents_behind_one_cloud_dropping_no_input() -> None:
    require_mosquitto()
    out = bench(
        "--sites", "4", "--per-process", "2", "--bake-s", "0", "--json", timeout_s=300
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["processes"] == 2
    assert result["rollout_state"] == "completed"
    assert result["converged"] == result["sites"] == 4
    assert result["verify_failures"] == 0
    assert result["inputs_during_rollout"] > 0
    assert result["swap_dropped"] == 0
    assert result["unanswered"] == 0
    # the edge part did not change: the sites fetched manifests, not models
    assert 0 < result["bytes_transferred"] < result["bytes_full"] / 4


def test_bench_rollout_store_is_for_light_sites_only() -> None:
    out = bench("--sites", "5", "--store", "sqlite:///x.db")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --store is for --light: real sites use the cloud's own fleet store"
    )
