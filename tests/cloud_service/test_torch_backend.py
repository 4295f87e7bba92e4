"""The torch backend: the converted ONNX graph equals onnxruntime's answer (eagerly on the
CPU here; through CUDA graphs, padded to captured sizes, on a GPU — marked ``gpu``)."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fogline.cloud_service import BackendChoice, BackendError
from fogline.cloud_service._torch_backend import TorchBackend, convert_onnx, supported_ops
from fogline.reference import BUNDLE_DIR
from fogline.reference._mlp import (
    REFERENCE_MLP_INPUT,
    REFERENCE_MLP_OUTPUT,
    write_reference_mlp,
)

REFERENCE_CLOUD = BUNDLE_DIR / "cloud.onnx"
BATCHES = (1, 3, 8, 32)


def onnxruntime_answer(model: Path | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, bytes) else str(model)
    return [np.asarray(o) for o in ort.InferenceSession(source).run(None, feed)]


def features(rows: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def small_cnn(*, opset: int = 17) -> bytes:
    """A CNN tail over ``[N, 3, 8, 8]``: Conv, BatchNormalization, Relu, MaxPool, a grouped
    Conv, GlobalAveragePool, Flatten, Gemm and Softmax, plus a constant-shape Reshape and a
    Transpose on a side branch that is summed back in."""
    rng = np.random.default_rng(11)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("f4"), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], group=2, pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, alpha=0.5),
        helper.make_node("Reshape", ["logits", "shape"], ["grid"]),
        helper.make_node("Transpose", ["grid"], ["swapped"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["swapped", "back"], ["mixed"]),
        helper.make_node("Mul", ["mixed", "half"], ["scaled"]),
        helper.make_node("Add", ["logits", "scaled"], ["summed"]),
        helper.make_node("Softmax", ["summed"], ["probs"], axis=-1),
    ]
    initializers = [
        init("w1", 8, 3, 3, 3),
        init("b1", 8),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype("f4"), "g"),
        init("beta", 8),
        init("mu", 8),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype("f4"), "var"),
        init("w2", 6, 4, 3, 3),
        init("wf", 6, 6),
        init("bf", 6),
        numpy_helper.from_array(np.array([0, 2, 3], np.int64), "shape"),
        numpy_helper.from_array(np.array([-1, 6], np.int64), "back"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 6])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def images(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 8, 8)).astype(np.float32)


# --- on the CPU: the same module, eagerly -------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_the_reference_cloud_part_matches_onnxruntime_on_the_cpu(batch: int) -> None:
    backend = TorchBackend(REFERENCE_CLOUD, max_batch_size=32, device="cpu")
    assert (backend.name, backend.input_names, backend.output_names) == (
        "torch",
        ("features",),
        ("probs",),
    )
    assert not backend.cuda_graphs
    x = features(batch, 32, batch)
    out = backend.run({"features": x})["probs"]
    (expected,) = onnxruntime_answer(REFERENCE_CLOUD, {"features": x})
    assert out.dtype == np.float32
    assert out.shape == (batch, 10)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_the_bench_mlp_matches_onnxruntime_at_several_batch_sizes(tmp_path: Path) -> None:
    model = write_reference_mlp(tmp_path, layers=(256, 512, 256, 10))
    backend = TorchBackend(model, max_batch_size=32, device="cpu")
    for batch in BATCHES:
        x = features(batch, 256, batch)
        out = backend.run({REFERENCE_MLP_INPUT: x})[REFERENCE_MLP_OUTPUT]
        (expected,) = onnxruntime_answer(model, {REFERENCE_MLP_INPUT: x})
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_cnn_tail_with_conv_pooling_and_batch_norm_matches_onnxruntime(
    opset: int, tmp_path: Path
) -> None:
    model = small_cnn(opset=opset)
    backend = TorchBackend(model_file(model, tmp_path), max_batch_size=8, device="cpu")
    for batch in (1, 5):
        x = images(batch, batch)
        (expected,) = onnxruntime_answer(model, {"x": x})
        np.testing.assert_allclose(backend.run({"x": x})["probs"], expected, atol=1e-5)


def model_file(blob: bytes, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(blob)
    return path


def one_node_model(node: onnx.NodeProto, inits: list[TensorProto] | None = None) -> bytes:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_an_unsupported_op_is_refused_at_load_naming_the_op_and_the_node() -> None:
    model = one_node_model(helper.make_node("TopK", ["x", "k"], ["y", "i"], name="pick_best"))
    with pytest.raises(BackendError, match=r"TopK node 'pick_best' uses op 'TopK'.*not support"):
        convert_onnx(model)
    assert "TopK" not in supported_ops()
    assert {"Gemm", "MatMul", "Conv", "Softmax", "GlobalAveragePool"} <= set(supported_ops())


def test_a_custom_domain_op_is_refused_with_its_domain() -> None:
    node = helper.make_node("FusedGemm", ["x"], ["y"], name="fused", domain="com.microsoft")
    with pytest.raises(BackendError, match=r"FusedGemm node 'fused' is in the custom domain"):
        convert_onnx(one_node_model(node))


def test_a_shape_computed_at_run_time_is_refused_at_load() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Reshape", ["x", "s"], ["y"], name="dyn"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BackendError, match="Shape node"):
        convert_onnx(model)
    only_reshape = one_node_model(helper.make_node("Reshape", ["x", "x"], ["y"], name="dyn"))
    with pytest.raises(BackendError, match="Reshape node 'dyn' needs a constant shape"):
        convert_onnx(only_reshape)


def test_bytes_that_are_not_onnx_are_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "cloud.onnx"
    bad.write_bytes(b"\x00\xffnot a model")
    with pytest.raises(BackendError, match="cannot read the cloud model"):
        TorchBackend(bad, device="cpu")


def test_inputs_are_cast_to_the_model_type_and_checked() -> None:
    backend = TorchBackend(REFERENCE_CLOUD, max_batch_size=4, device="cpu")
    x = features(2, 32, 0)
    as_double = backend.run({"features": x.astype(np.float64)})["probs"]
    np.testing.assert_allclose(as_double, backend.run({"features": x})["probs"])
    with pytest.raises(BackendError, match="missing input"):
        backend.run({"other": x})


def test_a_backend_choice_for_torch_loads_the_torch_backend(tiny_bundle: Path) -> None:
    choice = BackendChoice("torch", "test", device="cpu")
    backend = choice.load(tiny_bundle / "cloud.onnx", max_batch_size=4, threads=1)
    assert isinstance(backend, TorchBackend)
    backend.warmup()
    x = features(3, 16, 1)
    (expected,) = onnxruntime_answer(tiny_bundle / "cloud.onnx", {"features": x})
    np.testing.assert_allclose(backend.run({"features": x})["probs"], expected, atol=1e-6)


def test_misuse_of_the_constructor_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        TorchBackend(REFERENCE_CLOUD, max_batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        TorchBackend(REFERENCE_CLOUD, device="tpu")
    with pytest.raises(ValueError, match="batch_sizes"):
        TorchBackend(REFERENCE_CLOUD, max_batch_size=4, batch_sizes=(2, 8), device="cpu")


# --- on a GPU: CUDA graphs ------------------------------------------------------------------


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
# TF32 is off by default for matrix products in torch, so the MLPs stay near FP32; cuDNN
# convolutions use TF32 (10-bit mantissa) by default, which the CNN's tolerance covers.
GPU_ATOL = 1e-4
CNN_GPU_ATOL = 5e-3


@pytest.mark.gpu
@gpu
def test_cuda_graphs_match_onnxruntime_over_the_batch_range() -> None:
    backend = TorchBackend(REFERENCE_CLOUD, max_batch_size=8, device="cuda")
    backend.warmup()
    assert backend.cuda_graphs
    assert backend.captured_batch_sizes == tuple(range(1, 9))
    for batch in range(1, 9):
        x = features(batch, 32, batch)
        (expected,) = onnxruntime_answer(REFERENCE_CLOUD, {"features": x})
        out = backend.run({"features": x})["probs"]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, expected, atol=GPU_ATOL)


@pytest.mark.gpu
@gpu
def test_the_bench_mlp_through_cuda_graphs_matches_onnxruntime(tmp_path: Path) -> None:
    model = write_reference_mlp(tmp_path)
    backend = TorchBackend(model, max_batch_size=32, device="cuda")
    for batch in BATCHES:
        x = features(batch, 256, batch)
        (expected,) = onnxruntime_answer(model, {REFERENCE_MLP_INPUT: x})
        out = backend.run({REFERENCE_MLP_INPUT: x})[REFERENCE_MLP_OUTPUT]
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_a_batch_is_padded_to_the_next_captured_size_and_no_stale_row_leaks() -> None:
    backend = TorchBackend(REFERENCE_CLOUD, max_batch_size=8, batch_sizes=(1, 4, 8), device="cuda")
    assert backend.captured_batch_sizes == (1, 4, 8)
    assert [backend.padded_size(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 4, 4, 4, 8, 8]
    full = features(4, 32, 40)
    backend.run({"features": full})  # leaves four rows in the size-4 buffers
    x = features(3, 32, 41)
    out = backend.run({"features": x})["probs"]
    (expected,) = onnxruntime_answer(REFERENCE_CLOUD, {"features": x})
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, expected, atol=GPU_ATOL)
    with pytest.raises(BackendError, match="larger than the largest captured size 8"):
        backend.run({"features": features(9, 32, 0)})


@pytest.mark.gpu
@gpu
def test_a_cnn_tail_through_cuda_graphs_matches_onnxruntime(tmp_path: Path) -> None:
    model = small_cnn()
    backend = TorchBackend(model_file(model, tmp_path), max_batch_size=8, device="cuda")
    assert backend.cuda_graphs
    for batch in (1, 5, 8):
        x = images(batch, batch)
        (expected,) = onnxruntime_answer(model, {"x": x})
        np.testing.assert_allclose(backend.run({"x": x})["probs"], expected, atol=CNN_GPU_ATOL)


@pytest.mark.gpu
@gpu
def test_threads_running_at_once_each_get_their_own_answer() -> None:
    backend = TorchBackend(REFERENCE_CLOUD, max_batch_size=8, device="cuda")
    barrier = threading.Barrier(8)

    def one(seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = features(1 + seed % 8, 32, seed)
        barrier.wait()
        return x, backend.run({"features": x})["probs"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for x, out in results:
        (expected,) = onnxruntime_answer(REFERENCE_CLOUD, {"features": x})
        np.testing.assert_allclose(out, expected, atol=GPU_ATOL)


@pytest.mark.gpu
@gpu
def test_auto_picks_torch_on_a_cuda_host_without_tensorrt() -> None:
    from fogline.cloud_service import select_backend

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here and comes first")
    choice = select_backend("auto")
    assert (choice.kind, choice.device) == ("torch", "cuda")
