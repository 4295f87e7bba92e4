"""``fogline bench edge`` on the reference bundle and a real Mosquitto, briefly.

Only the shape of the result is checked: speeds depend on the machine and are never
asserted.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fogline._bench import app

pytestmark = pytest.mark.integration


def test_bench_edge_measures_each_part_in_every_round_and_reports_the_ratios() -> None:
    args = ["edge", "--samples", "128", "--seconds", "0.3", "--rounds", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rounds"] == 2
    for key in ("ort_raw_sps", "agent_sps", "fp32_raw_sps"):
        assert out[key] > 0
    assert out["agent_vs_raw"] == pytest.approx(out["agent_sps"] / out["ort_raw_sps"], abs=1e-3)
    assert out["int8_vs_fp32_speedup"] == pytest.approx(
        out["ort_raw_sps"] / out["fp32_raw_sps"], abs=1e-3
    )
    assert 0 <= out["int8_accuracy_delta"] <= 100
    assert 0 <= out["forwarded_share"] <= 1
