"""``fogline cloud batch``: files of inputs scored through the repository at the bulk lane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fogline._cli_cloud import batch_command
from fogline.cloud_service._backends import BackendChoice
from fogline.cloud_service._batch_job import load_inputs, save_outputs, score
from fogline.cloud_service._repository import ModelRepository
from fogline.cloud_service.errors import InferenceInputError
from fogline.reference._mlp import reference_mlp_forward, write_reference_mlp

app = typer.Typer()
app.command()(batch_command)


def scale_model(fixed_batch: bool = False) -> onnx.ModelProto:
    """FP32 [N, 3] times 2 (and INT64 [N] plus 1): two outputs, any number of rows."""
    batch: int | str = 1 if fixed_batch else "N"
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Add", ["k", "one"], ["k_next"]),
        ],
        "scale",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [batch]),
        ],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("k_next", TensorProto.INT64, [batch]),
        ],
        [
            numpy_helper.from_array(np.full(3, 2.0, np.float32), "two"),
            numpy_helper.from_array(np.ones(1, np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for name, fixed in (("scale", False), ("single", True)):
        (root / name / "1").mkdir(parents=True)
        onnx.save(scale_model(fixed), str(root / name / "1" / "model.onnx"))
    (root / "scale" / "config.toml").write_text("max_batch_size = 8\n")
    return root


@pytest.fixture
def repo(models: Path) -> Iterator[ModelRepository]:
    r = ModelRepository(models, backend=BackendChoice("onnxruntime", "tests run on the CPU"))
    r.start()
    yield r
    r.stop()


def items(n: int) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
        "k": np.arange(n, dtype=np.int64),
    }


def test_score_runs_every_item_in_chunks_at_the_bulk_lane(repo: ModelRepository) -> None:
    seen: list[int] = []
    out = score(repo, "scale", items(37), chunk=5, on_progress=seen.append)
    np.testing.assert_array_equal(out["doubled"], items(37)["x"] * 2)
    np.testing.assert_array_equal(out["k_next"], items(37)["k"] + 1)
    assert seen == [5] * 7 + [2]
    labels = {"model": "scale", "version": "1", "lane": "bulk", "outcome": "ok"}
    assert repo.metrics.value("fogline_model_requests_total", labels) == 8
    assert repo.metrics.value("fogline_model_batch_size_count", {"model": "scale"}) <= 8


def test_score_sends_each_item_alone_to_a_model_that_does_not_batch(
    repo: ModelRepository,
) -> None:
    data = {"x": items(4)["x"].reshape(4, 1, 3), "k": items(4)["k"].reshape(4, 1)}
    out = score(repo, "single", data)
    assert out["doubled"].shape == (4, 1, 3)
    np.testing.assert_array_equal(out["doubled"], data["x"] * 2)


@pytest.mark.parametrize(
    ("data", "chunk", "message"),
    [
        ({"x": items(2)["x"]}, None, r"has no array 'k'"),
        ({**items(2), "y": np.zeros(2)}, None, r"has an array 'y', but model 'scale' takes"),
        ({**items(2), "k": np.zeros(2, np.float32)}, None, r"'k' has dtype float32.*INT64"),
        ({**items(2), "k": np.arange(3)}, None, r"disagree on the number of items"),
        (items(0), None, r"holds no items"),
        (items(2), 9, r"chunk 9 must lie in 1..8"),
        ({**items(1), "k": np.int64(3)}, None, r"'k' is a scalar"),
    ],
)
def test_score_refuses_inputs_that_do_not_fit(
    repo: ModelRepository, data: dict[str, np.ndarray], chunk: int | None, message: str
) -> None:
    with pytest.raises(InferenceInputError, match=message):
        score(repo, "scale", data, chunk=chunk)


def test_the_command_scores_a_file_and_writes_every_output(models: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.npz"
    data = items(50)
    np.savez(source, x=data["x"].astype(np.float64), k=data["k"])  # float64 is cast to FP32
    target = tmp_path / "out" / "scored.npz"
    result = CliRunner().invoke(
        app,
        [
            "--model-repository", str(models), "--model", "scale", "--input", str(source),
            "-o", str(target), "--chunk", "4", "--no-progress", "--backend", "onnxruntime",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "scored 50 items with scale" in result.stdout
    with np.load(target) as out:
        assert sorted(out.files) == ["doubled", "k_next"]
        np.testing.assert_array_equal(out["doubled"], data["x"] * 2)
        assert out["doubled"].dtype == np.float32


def test_the_command_scores_the_reference_mlp_at_a_chosen_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_reference_mlp(root, version=1)
    write_reference_mlp(root, version=2, seed=7)
    x = np.random.default_rng(0).standard_normal((40, 256)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x)
    result = CliRunner().invoke(
        app,
        [
            "--model-repository", str(root), "--model", "mlp", "--version", "1",
            "--input", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"),
            "--backend", "onnxruntime",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], reference_mlp_forward(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "ghost"], "error: no model named 'ghost' in"),
        (["--version", "3"], "error: unknown version '3' of model 'scale'"),
        (["--chunk", "0"], "error: --chunk must be at least 1, got 0"),
        (["--chunk", "20"], "error: chunk 20 must lie in 1..8"),
        (["--input", "missing.npz"], "error: input file missing.npz does not exist"),
        (["--input", "not-npz.npz"], "error: input file not-npz.npz is not a readable .npz"),
        (["--input", "wrong.npz"], "error: wrong.npz has no array 'k'"),
        (["--input", "scalar.npz"], "error: scalar.npz: array 'k' is a scalar"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(
    models: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "good.npz", **items(3))
    np.savez(tmp_path / "wrong.npz", x=items(3)["x"])
    np.savez(tmp_path / "scalar.npz", x=items(3)["x"], k=np.int64(1))
    (tmp_path / "not-npz.npz").write_text("hello")
    base = {
        "--model-repository": str(models),
        "--model": "scale",
        "--input": "good.npz",
        "-o": str(tmp_path / "out.npz"),
        "--backend": "onnxruntime",
    }
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    argv = [part for kv in base.items() for part in kv] + ["--no-progress"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(message), lines[0]
    assert not (tmp_path / "out.npz").exists()


def test_inputs_and_outputs_round_trip_without_pickles(tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    texts = np.array([b"a", b"bc"], dtype=object)
    save_outputs(path, {"t": texts, "v": np.arange(2)})
    back = load_inputs(path)
    assert list(back["t"]) == [b"a", b"bc"]
    np.save(tmp_path / "plain.npy", np.arange(3))
    with pytest.raises(InferenceInputError, match=r"single \.npy array"):
        load_inputs(tmp_path / "plain.npy")
