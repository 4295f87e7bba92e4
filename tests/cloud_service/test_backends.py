"""Backends: onnxruntime on the CPU here; native TensorRT only where CUDA is present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fogline.cloud_service import Backend, BackendError, OnnxRuntimeBackend, select_backend
from fogline.cloud_service._backends import choose_providers, dummy_shape
from fogline.cloud_service._tensorrt import engine_cache_key


def reference(model: Path, features: np.ndarray) -> np.ndarray:
    (out,) = ort.InferenceSession(str(model)).run(["probs"], {"features": features})
    return np.asarray(out)


def test_the_onnxruntime_backend_matches_a_plain_session(tiny_bundle: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_bundle / "cloud.onnx", max_batch_size=8)
    assert isinstance(backend, Backend)
    assert backend.name == "onnxruntime"
    assert backend.input_names == ("features",)
    assert backend.output_names == ("probs",)
    assert backend.providers[-1] == "CPUExecutionProvider"
    backend.warmup()
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    out = backend.run({"features": x})
    np.testing.assert_allclose(out["probs"], reference(tiny_bundle / "cloud.onnx", x), rtol=1e-6)


def test_inputs_are_cast_to_what_the_model_takes(tiny_bundle: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_bundle / "cloud.onnx")
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float16)
    out = backend.run({"features": x})
    expected = reference(tiny_bundle / "cloud.onnx", x.astype(np.float32))
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)


def test_a_run_the_model_rejects_is_a_backend_error(tiny_bundle: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_bundle / "cloud.onnx")
    with pytest.raises(BackendError, match="run failed"):
        backend.run({"features": np.zeros((2, 3), np.float32)})


def test_a_file_that_is_not_a_model_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "cloud.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(BackendError, match="cannot load"):
        OnnxRuntimeBackend(bad)


def test_providers_are_ordered_best_first_with_cpu_last() -> None:
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(
        ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    ) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_warmup_shapes_fill_symbolic_axes() -> None:
    assert dummy_shape(["N", 16], 8) == (8, 16)
    assert dummy_shape([-1, 3, "H", 7], 2) == (2, 3, 1, 7)


def cuda_and_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(cuda_and_tensorrt(), reason="this host can run TensorRT")
def test_auto_falls_back_to_onnxruntime_and_says_why() -> None:
    choice = select_backend("auto")
    assert choice.kind == "onnxruntime"
    assert "TensorRT unavailable" in choice.reason
    with pytest.raises(BackendError, match="TensorRT backend requested but unavailable"):
        select_backend("tensorrt")


def test_onnxruntime_can_be_asked_for_by_name() -> None:
    assert select_backend("onnxruntime").kind == "onnxruntime"
    with pytest.raises(ValueError, match="auto, onnxruntime or tensorrt"):
        select_backend("cuda")


def test_the_engine_cache_key_changes_with_everything_an_engine_depends_on() -> None:
    base = (b"model", "10.9.0", "NVIDIA L4", 32, False)
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base)
    for i, other in enumerate((b"model2", "11.0.0", "NVIDIA A100", 16, True)):
        changed = list(base)
        changed[i] = other
        assert engine_cache_key(*changed) != key  # type: ignore[arg-type]


gpu = pytest.mark.skipif(not cuda_and_tensorrt(), reason="needs tensorrt and a CUDA device")


@pytest.mark.gpu
@gpu
def test_auto_picks_tensorrt_where_cuda_is_present() -> None:
    assert select_backend("auto").kind == "tensorrt"


@pytest.mark.gpu
@gpu
def test_tensorrt_matches_onnxruntime_and_reuses_its_cached_engine(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fogline.cloud_service._tensorrt import TensorRTBackend

    model = tiny_bundle / "cloud.onnx"
    backend = TensorRTBackend(model, max_batch_size=8, cache_dir=tmp_path)
    engines = list(tmp_path.glob("*.engine"))
    assert len(engines) == 1
    backend.warmup()
    assert backend.name == "tensorrt"
    assert backend.input_names == ("features",)
    for n in (1, 5, 8):
        x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
        np.testing.assert_allclose(
            backend.run({"features": x})["probs"], reference(model, x), atol=1e-3
        )
    mtime = engines[0].stat().st_mtime_ns
    again = TensorRTBackend(model, max_batch_size=8, cache_dir=tmp_path)
    assert engines[0].stat().st_mtime_ns == mtime
    assert list(tmp_path.glob("*.engine")) == engines
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(again.run({"features": x})["probs"], reference(model, x), atol=1e-3)
