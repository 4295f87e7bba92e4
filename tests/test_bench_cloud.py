"""``fogline bench cloud`` end to end on a real server, with a short measurement.

Only the shape of the result and that every case answered are checked: the figures
themselves depend on the machine and are never asserted.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from fogline._bench_cloud import bench_cloud

pytestmark = pytest.mark.integration


def test_bench_cloud_prints_rps_and_latency_for_batching_off_and_on() -> None:
    app = typer.Typer()
    app.command("cloud")(bench_cloud)
    app.command("other")(lambda: None)  # keeps "cloud" a subcommand, as under `bench`
    result = CliRunner().invoke(app, ["cloud", "--seconds", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {
        "batching_off",
        "batching_on",
        "batching_gain",
        "target_batching_gain",
        "backend",
        "model_params",
    }
    for mode in ("batching_off", "batching_on"):
        assert set(out[mode]) == {"c1", "c16"}
        for case in out[mode].values():
            assert case["rps"] > 0
            assert set(case["latency_ms"]) == {"p50", "p99"}
            assert 0 < case["latency_ms"]["p50"] <= case["latency_ms"]["p99"]
    assert out["batching_gain"] > 0
    assert out["target_batching_gain"] == 2.5
    assert out["backend"]["kind"] == "onnxruntime"
    assert "requested in the configuration" in out["backend"]["reason"]
    assert out["model_params"] == 256 * 4096 + 4096 + 4096 * 2048 + 2048 + 2048 * 10 + 10


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_bench_cloud_refuses_a_backend_this_host_cannot_run_before_starting_a_server() -> None:
    app = typer.Typer()
    app.command("cloud")(bench_cloud)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["cloud", "--backend", "tensorrt", "--json"])
    assert result.exit_code == 2
    assert "TensorRT backend requested but unavailable" in result.output


def test_bench_cloud_runs_on_the_torch_backend() -> None:
    app = typer.Typer()
    app.command("cloud")(bench_cloud)
    app.command("other")(lambda: None)
    args = ["cloud", "--seconds", "0.2", "--layers", "256,64,10", "--backend", "torch", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["backend"]["kind"] == "torch"
    assert out["batching_on"]["c16"]["rps"] > 0
