"""``fogline model``: exit codes, one-line errors, tables and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fogline.cli import app

FOGLINE = Path(sys.executable).with_name("fogline")


def _mlp(path: Path) -> Path:
    """x [batch, 8] → Gemm → Relu → Gemm → Relu → Gemm → Softmax, a well-separated classifier."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.zeros(16, np.float32), "b2"),
            numpy_helper.from_array((rng.standard_normal((3, 16)) * 2).astype(np.float32), "w3"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b3"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _random_tail(path: Path) -> Path:
    """A model with a random op after ``r``: a cut there can never be proven."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("RandomNormalLike", ["r"], ["noise"]),
            helper.make_node("Add", ["r", "noise"], ["y"]),
        ],
        "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mlp(tmp_path_factory.mktemp("cli") / "mlp.onnx")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "samples.npz"
    x = np.random.default_rng(1).standard_normal((48, 8)).astype(np.float32)
    np.savez(path, x=x)
    return path


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_split_prints_the_proof_and_exits_0(runner: CliRunner, mlp: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", "split", str(mlp), "--at", "r1", "-o", str(tmp_path)])

    assert result.exit_code == 0, result.output
    assert "proven" in result.stdout
    assert "probs" in result.stdout
    assert (tmp_path / "edge.onnx").is_file()
    assert (tmp_path / "cloud.onnx").is_file()


def test_split_json_with_given_inputs(
    runner: CliRunner, mlp: Path, calibration: Path, tmp_path: Path
) -> None:
    args = ["model", "split", str(mlp), "--at", "r1", "--at", "h2", "-o", str(tmp_path)]
    result = runner.invoke(app, [*args, "--inputs", str(calibration), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["cut"] == ["r1", "h2"]
    assert [c["name"] for c in report["cases"]] == ["random", "given"]
    assert report["cases"][1]["input_shapes"] == {"x": [48, 8]}


def test_split_that_cannot_be_proven_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    model = _random_tail(tmp_path / "noisy.onnx")
    result = runner.invoke(
        app, ["model", "split", str(model), "--at", "r", "-o", str(tmp_path / "p")]
    )

    assert result.exit_code == 1, result.output
    assert "not proven" in result.stdout


def test_non_onnx_file_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\n")
    done = subprocess.run(
        [str(FOGLINE), "model", "split", str(path), "--at", "r1", "-o", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 2
    assert "not an ONNX model" in _one_error_line(done.stderr)
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--at", "nope"], "no tensor named 'nope'"),
        (["--at", "probs"], "does not separate anything"),
    ],
)
def test_split_bad_cut_exits_2(
    runner: CliRunner, mlp: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["model", "split", str(mlp), *args, "-o", str(tmp_path)])

    assert result.exit_code == 2
    assert message in _one_error_line(result.stderr)


def test_missing_model_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["model", "split", str(tmp_path / "absent.onnx"), "--at", "r1", "-o", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert "no such file" in _one_error_line(result.stderr)


def test_quantize_prints_size_speed_agreement_and_candidates(
    runner: CliRunner, mlp: Path, calibration: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mlp.int8.onnx"
    result = runner.invoke(
        app, ["model", "quantize", str(mlp), "--calibration", str(calibration), "-o", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert out.is_file()
    for text in ("strategy", "size", "speed", "agreement probs", "static-minmax", "chosen"):
        assert text in result.stdout


def test_quantize_json(runner: CliRunner, mlp: Path, calibration: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlp.int8.onnx"
    args = ["model", "quantize", str(mlp), "--calibration", str(calibration), "-o", str(out)]
    result = runner.invoke(app, [*args, "--metric", "cosine", "--target", "0.97", "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == {"probs": "cosine"}
    assert report["target"] == 0.97
    assert report["agreement"] >= 0.97
    assert any(c["accepted"] for c in report["candidates"])


def test_quantize_unreachable_target_exits_1(
    runner: CliRunner, mlp: Path, calibration: Path, tmp_path: Path
) -> None:
    args = ["model", "quantize", str(mlp), "--calibration", str(calibration)]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "o.onnx"), "--target", "1.01"])

    assert result.exit_code == 1
    assert "target 1.01 cannot be met" in _one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((16, 7), np.float32)}, "'x' has shape [16, 7]; expected [batch, 8]"),
        ({"y": np.zeros((16, 8), np.float32)}, "'y' is not an input of the model"),
        ({"x": np.zeros((16, 8), np.int64)}, "'x' is int64; the model expects float32"),
    ],
)
def test_quantize_bad_calibration_exits_2(
    runner: CliRunner, mlp: Path, tmp_path: Path, arrays: dict[str, Any], message: str
) -> None:
    samples = tmp_path / "bad.npz"
    np.savez(samples, **arrays)
    result = runner.invoke(
        app,
        [
            "model",
            "quantize",
            str(mlp),
            "--calibration",
            str(samples),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
    )

    assert result.exit_code == 2
    assert message in _one_error_line(result.stderr)


def test_quantize_calibration_file_that_is_not_npz_exits_2(
    runner: CliRunner, mlp: Path, tmp_path: Path
) -> None:
    samples = tmp_path / "samples.npz"
    samples.write_text("x,y\n1,2\n")
    result = runner.invoke(
        app,
        [
            "model",
            "quantize",
            str(mlp),
            "--calibration",
            str(samples),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
    )

    assert result.exit_code == 2
    assert "not an .npz file" in _one_error_line(result.stderr)


def test_build_reference_calls_the_builder_and_prints_its_summary(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def build_reference(
        out_dir: Path, *, seed: int = 0, quick: bool = False, progress: Any = None
    ) -> dict[str, Any]:
        calls.append({"out_dir": out_dir, "seed": seed, "quick": quick})
        progress("training")
        return {"bundle": "reference@1", "speed": {"int8_vs_fp32_speedup": 2.5}}

    fake = types.ModuleType("fogline.reference._build")
    fake.build_reference = build_reference  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fogline.reference._build", fake)

    args = ["model", "build-reference", "-o", str(tmp_path), "--seed", "3", "--quick"]
    table = runner.invoke(app, args)
    as_json = runner.invoke(app, [*args, "--json"])

    assert table.exit_code == 0, table.output
    assert "speed.int8_vs_fp32_speedup" in table.stdout
    assert "reference@1" in table.stdout
    assert json.loads(as_json.stdout) == {
        "bundle": "reference@1",
        "speed": {"int8_vs_fp32_speedup": 2.5},
    }
    assert calls == [{"out_dir": tmp_path, "seed": 3, "quick": True}] * 2


def test_quantize_target_no_strategy_reaches_exits_1_naming_the_best(
    runner: CliRunner, mlp: Path, calibration: Path, tmp_path: Path
) -> None:
    args = ["model", "quantize", str(mlp), "--calibration", str(calibration)]
    result = runner.invoke(
        app, [*args, "-o", str(tmp_path / "o.onnx"), "--metric", "cosine", "--target", "0.9999999"]
    )

    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "best was cosine 0.9" in line
    assert "target 0.9999999 " in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(("int8_vs_fp32_time", "warned"), [(2.0, True), (0.5, False)])
def test_quantize_warns_when_the_chosen_int8_model_is_slower_than_fp32(
    runner: CliRunner,
    mlp: Path,
    calibration: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    int8_vs_fp32_time: float,
    warned: bool,
) -> None:
    import dataclasses

    from fogline.compression import _quantize

    real = _quantize.quantize_model

    def timed(*args: Any, **kwargs: Any) -> Any:
        # The measured speed depends on the host: the test sets it.
        report = real(*args, **kwargs)
        return dataclasses.replace(
            report, int8_latency_ms=report.fp32_latency_ms * int8_vs_fp32_time
        )

    monkeypatch.setattr(_quantize, "quantize_model", timed)
    out = tmp_path / "mlp.int8.onnx"
    args = ["model", "quantize", str(mlp), "--calibration", str(calibration), "-o", str(out)]
    result = runner.invoke(app, [*args, "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["speedup"] == pytest.approx(1 / int8_vs_fp32_time)
    assert ("the FP32 model may serve better" in result.stderr) is warned


def _quantize_with(runner: CliRunner, mlp: Path, samples: Path, tmp_path: Path) -> Any:
    out = tmp_path / "o.onnx"
    result = runner.invoke(
        app, ["model", "quantize", str(mlp), "--calibration", str(samples), "-o", str(out)]
    )
    assert not out.exists()
    return result


def test_attack_all_zero_calibration_frames_are_refused_with_one_line_and_exit_2(
    runner: CliRunner, mlp: Path, tmp_path: Path
) -> None:
    samples = tmp_path / "zeros.npz"
    np.savez(samples, x=np.zeros((64, 8), np.float32))
    result = _quantize_with(runner, mlp, samples, tmp_path)

    assert result.exit_code == 2
    assert _one_error_line(result.stderr).startswith(
        "error: all 64 calibration samples are identical"
    )


def _text(path: Path) -> None:
    path.write_text("x,y\n1,2\n")


def _truncated(path: Path) -> None:
    np.savez(path, x=np.ones((32, 8), np.float32))
    path.write_bytes(path.read_bytes()[:200])


def _objects(path: Path) -> None:
    np.savez(path, x=np.array([{"a": 1}] * 32, dtype=object))


def _strings(path: Path) -> None:
    np.savez(path, x=np.array(["a"] * 32))


def _not_an_array(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "frames from camera 3")


def _nothing(path: Path) -> None:
    np.savez(path)


def _misnamed(path: Path) -> None:
    np.savez(path, frames=np.ones((32, 8), np.float32))


def _wrong_dtype(path: Path) -> None:
    np.savez(path, x=np.ones((32, 8), np.complex64))


def _wrong_shape(path: Path) -> None:
    np.savez(path, x=np.ones((32, 4, 2), np.float32))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_text, "samples.npz: not an .npz file (numpy.savez writes one: name=array, ...)"),
        (_truncated, "samples.npz: not a readable .npz file"),
        (_objects, "samples.npz: 'x' holds pickled Python objects, not numbers"),
        (_strings, "samples.npz: 'x' holds <U1 values, not numbers"),
        (_not_an_array, "samples.npz: 'notes.txt' is not a NumPy array"),
        (_nothing, "samples.npz: holds no arrays"),
        (_misnamed, "calibration input 'frames' is not an input of the model"),
        (_wrong_dtype, "calibration input 'x' is complex64; the model expects float32"),
        (_wrong_shape, "calibration input 'x' has shape [32, 4, 2]; expected [batch, 8]"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_a_malformed_calibration_file_is_one_line_naming_the_problem_and_exit_2(
    runner: CliRunner, mlp: Path, tmp_path: Path, make: Any, message: str
) -> None:
    samples = tmp_path / "samples.npz"
    make(samples)
    result = _quantize_with(runner, mlp, samples, tmp_path)

    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert message in line
    assert "pickle.load" not in line
    assert "allow_pickle" not in line


def test_quantize_prints_the_report_warnings_on_stderr_also_with_json(
    runner: CliRunner,
    mlp: Path,
    calibration: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from fogline.compression import _quantize

    real = _quantize.quantize_model

    def warned(*args: Any, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)
        return dataclasses.replace(report, warnings=("output 'probs' barely varies [sic]",))

    monkeypatch.setattr(_quantize, "quantize_model", warned)
    out = tmp_path / "mlp.int8.onnx"
    args = ["model", "quantize", str(mlp), "--calibration", str(calibration), "-o", str(out)]
    result = runner.invoke(app, [*args, "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["warnings"] == ["output 'probs' barely varies [sic]"]
    assert "warning: output 'probs' barely varies [sic]" in result.stderr
