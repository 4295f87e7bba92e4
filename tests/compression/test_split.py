"""Splitting ONNX models into edge and cloud parts, and proving the cut."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fogline.compression import ModelError, SplitError
from fogline.compression._split import split_model

RNG = np.random.default_rng(0)


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else shape[0])
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _cnn(path: Path, opset: int = 17) -> Path:
    """conv → relu → strided conv → relu → conv → (+ skip) → relu → pool → gemm → softmax."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r2"], ["res"]),
        helper.make_node("Relu", ["res"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inits = [
        _weight("w1", 8, 3, 3, 3),
        _weight("b1", 8),
        _weight("w2", 16, 8, 3, 3),
        _weight("b2", 16),
        _weight("w3", 16, 16, 3, 3),
        _weight("b3", 16),
        _weight("wf", 10, 16),
        _weight("bf", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return _save(graph, path, opset)


def _encoder(path: Path, vocab: int = 2, dim: int = 8) -> Path:
    """Token embedding (Gather on int64 ids) → masked attention → LayerNorm → masked mean.

    The mask is read only after the embedding: a cut at ``emb`` leaves the cloud needing it.
    """
    inits = [
        _weight("table", vocab, dim),
        _weight("wq", dim, dim),
        _weight("wk", dim, dim),
        _weight("wv", dim, dim),
        numpy_helper.from_array(np.ones(dim, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "beta"),
        numpy_helper.from_array(np.float32(1.0), "one"),
        numpy_helper.from_array(np.float32(-1e4), "big"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Add", ["emb", "type_emb"], ["h0"]),
        helper.make_node("MatMul", ["h0", "wq"], ["q"]),
        helper.make_node("MatMul", ["h0", "wk"], ["k"]),
        helper.make_node("MatMul", ["h0", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "big"], ["bias2"]),
        helper.make_node("Unsqueeze", ["bias2", "axis1"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"]),
        helper.make_node("Add", ["ctx", "h0"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["hidden"], axis=-1),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["m3"]),
        helper.make_node("Mul", ["hidden", "m3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("type_emb", TensorProto.FLOAT, ["batch", "seq", dim]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    return _save(graph, path)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def _input_names(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.input]


def _edge_then_cloud(
    edge: Path, cloud: Path, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    edge_out = _run(edge, feeds)
    cloud_out = _run(cloud, {name: edge_out[name] for name in _input_names(cloud)})
    return edge_out | cloud_out


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_cnn_cut_at_an_intermediate_reproduces_its_outputs(tmp_path: Path, opset: int) -> None:
    model = _cnn(tmp_path / "cnn.onnx", opset)
    report = split_model(model, ["r1"], tmp_path / "parts")

    assert report.passed
    assert report.cut == ("r1",)
    assert report.cloud_outputs == ("probs",)
    assert _input_names(report.cloud_model) == ["r1"]
    x = RNG.standard_normal((5, 3, 16, 16)).astype(np.float32)
    expected = _run(model, {"x": x})["probs"]
    got = _edge_then_cloud(report.edge_model, report.cloud_model, {"x": x})["probs"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_skip_connection_over_the_cut_is_emitted_by_the_edge(tmp_path: Path) -> None:
    model = _cnn(tmp_path / "cnn.onnx")
    # c3 is added to r2 after the cut: the cloud part needs r2 too, from the edge
    report = split_model(model, ["c3"], tmp_path / "parts")

    assert report.passed
    assert [(b.name, b.origin) for b in report.boundary] == [("c3", "cut"), ("r2", "skip")]
    assert _input_names(report.cloud_model) == ["c3", "r2"]
    cloud_ops = [n.op_type for n in onnx.load(str(report.cloud_model)).graph.node]
    assert cloud_ops.count("Conv") == 0  # nothing before the cut is recomputed in the cloud
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        _edge_then_cloud(report.edge_model, report.cloud_model, {"x": x})["probs"],
        _run(model, {"x": x})["probs"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_attention_mask_read_after_the_cut_is_passed_through_by_the_edge(tmp_path: Path) -> None:
    model = _encoder(tmp_path / "enc.onnx", vocab=50)
    ids = RNG.integers(0, 50, (3, 7)).astype(np.int64)
    mask = np.ones((3, 7), np.int64)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    types = RNG.standard_normal((3, 7, 8)).astype(np.float32)
    given = {"input_ids": ids, "attention_mask": mask, "type_emb": types}

    report = split_model(model, ["emb"], tmp_path / "parts", inputs=given)

    assert report.passed
    assert [c.status for c in report.cases] == ["passed", "passed"]
    origins = {b.source: b.origin for b in report.boundary}
    assert origins == {"emb": "cut", "attention_mask": "input", "type_emb": "input"}
    cloud_inputs = _input_names(report.cloud_model)
    assert "attention_mask" not in cloud_inputs
    assert "input_ids" not in cloud_inputs
    edge_outputs = [o.name for o in onnx.load(str(report.edge_model)).graph.output]
    assert set(cloud_inputs) <= set(edge_outputs)
    np.testing.assert_allclose(
        _edge_then_cloud(report.edge_model, report.cloud_model, given)["embedding"],
        _run(model, given)["embedding"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_token_ids_with_dynamic_axes_and_a_two_token_vocabulary(tmp_path: Path) -> None:
    # random ids must stay inside even a two-entry embedding table, or the proof could not run
    model = _encoder(tmp_path / "enc.onnx", vocab=2)
    report = split_model(model, ["hidden"], tmp_path / "parts")

    assert report.passed
    (case,) = report.cases
    assert case.name == "random"
    ids_shape = case.input_shapes["input_ids"]
    assert ids_shape == case.input_shapes["attention_mask"]  # the shared "seq" axis agrees
    assert case.input_shapes["type_emb"] == (*ids_shape, 8)
    spec = next(b.spec for b in report.boundary if b.name == "hidden")
    assert spec.dtype == "float32"


def test_output_computed_before_the_cut_stays_on_the_edge(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["feat"]),
        helper.make_node("ReduceMean", ["h"], ["score"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["feat", "w2"], ["tail"]),
        helper.make_node("Sigmoid", ["tail"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3]),
        ],
        initializer=[_weight("w1", 4, 6), _weight("w2", 6, 3)],
    )
    model = _save(graph, tmp_path / "heads.onnx", opset=13)
    report = split_model(model, ["feat"], tmp_path / "parts")

    assert report.passed
    assert report.edge_outputs == ("score",)
    assert report.cloud_outputs == ("out",)
    assert [c.part for c in report.cases[0].checks] == ["edge", "cloud"]


def test_tensors_read_inside_if_branches_come_from_the_edge(tmp_path: Path) -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["scaled", "r"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["scaled", "r"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["scaled"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[
            numpy_helper.from_array(np.float32(2.0), "two"),
            numpy_helper.from_array(np.float32(0.0), "zero"),
        ],
    )
    model = _save(graph, tmp_path / "if.onnx")
    report = split_model(model, ["scaled"], tmp_path / "parts")

    assert report.passed
    crossing = {b.source: b.origin for b in report.boundary}
    assert crossing["scaled"] == "cut"
    assert crossing["r"] == "skip"  # read by both branches from the outer scope
    assert "x" in crossing  # the condition is computed in the cloud from the raw input
    for sign in (1.0, -1.0):
        x = (sign * np.abs(RNG.standard_normal((3, 4)))).astype(np.float32)
        np.testing.assert_allclose(
            _edge_then_cloud(report.edge_model, report.cloud_model, {"x": x})["y"],
            _run(model, {"x": x})["y"],
        )


def test_report_is_json_and_written_next_to_the_parts(tmp_path: Path) -> None:
    report = split_model(_cnn(tmp_path / "cnn.onnx"), ["c3"], tmp_path / "parts")
    data = report.to_dict()

    assert json.loads(json.dumps(data)) == data
    assert json.loads((tmp_path / "parts" / "split.json").read_text()) == data
    assert data["passed"] is True
    assert data["cut"] == ["c3", "r2"]
    check = data["cases"][0]["checks"][0]
    assert set(check) >= {"output", "max_abs_error", "max_rel_error", "passed"}


def test_unknown_tensor_is_a_model_error_that_names_it(tmp_path: Path) -> None:
    model = _cnn(tmp_path / "cnn.onnx")
    with pytest.raises(ModelError, match=r"no tensor named 'r4' in cnn\.onnx.*'r1'"):
        split_model(model, ["r1", "r4"], tmp_path / "parts")
    assert not (tmp_path / "parts").exists()


def test_weight_name_is_not_a_cut_point(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="'w2' is a weight"):
        split_model(_cnn(tmp_path / "cnn.onnx"), ["w2"], tmp_path / "parts")


@pytest.mark.parametrize("cut", ["probs", "x"])
def test_cut_that_separates_nothing_is_refused(tmp_path: Path, cut: str) -> None:
    with pytest.raises(SplitError, match="does not separate anything"):
        split_model(_cnn(tmp_path / "cnn.onnx"), [cut], tmp_path / "parts")


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", bytes(range(256)) * 8])
def test_file_that_is_not_onnx_is_a_model_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not an ONNX model"):
        split_model(path, ["r1"], tmp_path / "parts")


def test_sample_inputs_of_the_wrong_shape_are_named(tmp_path: Path) -> None:
    model = _cnn(tmp_path / "cnn.onnx")
    bad = {"x": np.zeros((2, 3, 15, 16), np.float32)}
    with pytest.raises(
        ModelError, match=r"'x' has shape \[2, 3, 15, 16\]; expected \[batch, 3, 16, 16\]"
    ):
        split_model(model, ["r1"], tmp_path / "parts", inputs=bad)


def test_proof_fails_when_the_parts_do_not_reproduce_the_model(tmp_path: Path) -> None:
    # a random op after the cut draws new numbers on every run: the cut cannot be proven
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("RandomNormalLike", ["r"], ["noise"]),
        helper.make_node("Add", ["r", "noise"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    report = split_model(_save(graph, tmp_path / "noisy.onnx"), ["r"], tmp_path / "parts")

    assert not report.passed
    (check,) = report.cases[0].checks
    assert not check.passed
    assert check.max_abs_error > 0


def test_model_tools_are_exported_but_not_imported_with_the_codec() -> None:
    # the edge agent imports the codec from this package; it must not drag in onnx
    code = (
        "import sys, fogline.compression as c\n"
        "assert 'onnx' not in sys.modules and 'onnxruntime.quantization' not in sys.modules\n"
        "assert c.split_model.__name__ == 'split_model'\n"
        "assert c.quantize_model.__name__ == 'quantize_model'\n"
        "assert {'SplitReport', 'QuantizationReport'} <= set(c.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
