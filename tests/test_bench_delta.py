"""``fogline bench delta`` in its quick form: the three kinds of change, each with what a
site downloaded against the whole edge part, within the product's targets."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fogline.cli import app


def test_bench_delta_reports_the_three_cases_within_their_targets() -> None:
    result = CliRunner().invoke(app, ["bench", "delta", "--mib", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    cases = out["cases"]
    assert set(cases) == {"replace", "finetune", "cloud_only"}
    edge = out["edge_bytes"]
    for case in cases.values():
        assert case["bytes_full"] > edge
        assert 0 < case["bytes_transferred"] <= case["bytes_full"]
        assert case["ratio"] == round(case["bytes_transferred"] / case["bytes_full"], 4)
        assert case["build_s"] >= 0
        assert case["apply_s"] >= 0
    assert cases["cloud_only"]["model_bytes"] == 0
    assert 0 < cases["replace"]["model_bytes"] <= 0.15 * edge
    assert 0 < cases["finetune"]["model_bytes"] <= 0.15 * edge
    assert out["delta_failures"] == 0
