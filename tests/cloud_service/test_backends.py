"""Backends: onnxruntime on the CPU here; native TensorRT only where CUDA is present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fogline.cloud_service import (
    Backend,
    BackendChoice,
    BackendError,
    OnnxRuntimeBackend,
    select_backend,
)
from fogline.cloud_service._backends import (
    Availability,
    choose_providers,
    dummy_shape,
    ort_provider_options,
)
from fogline.cloud_service._tensorrt import engine_cache_key
from fogline.compression._ort_errors import ONNXRUNTIME_EXCEPTIONS

ALL_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "AzureExecutionProvider",
    "CPUExecutionProvider",
)


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


@pytest.mark.parametrize("kind", ONNXRUNTIME_EXCEPTIONS, ids=lambda k: k.__name__)
def test_every_onnxruntime_error_at_run_becomes_the_clouds_backend_error(
    tiny_bundle: Path, kind: type[Exception]
) -> None:
    backend = OnnxRuntimeBackend(tiny_bundle / "cloud.onnx")

    class _Failing:
        def run(self, *args: object) -> None:
            raise kind("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : staged failure")

    backend._session = _Failing()  # type: ignore[assignment]
    with pytest.raises(BackendError, match="onnxruntime run failed: staged failure") as info:
        backend.run({"features": np.zeros((1, 16), np.float32)})
    assert type(info.value.__cause__) is kind


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


def test_without_a_cuda_device_the_gpu_providers_are_left_out() -> None:
    assert choose_providers(ALL_PROVIDERS, gpu=False) == ["CPUExecutionProvider"]
    assert choose_providers(ALL_PROVIDERS, gpu=True) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_tensorrt_provider_options_carry_cache_precision_profile_and_device(
    tmp_path: Path,
) -> None:
    trt, cuda, cpu = ort_provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        inputs={"features": ("N", 16), "mask": (-1, 4, 2), "scale": (1,), "step": ()},
        max_batch_size=32,
        opt_batch_size=8,
        engine_cache_dir=tmp_path,
        fp16=True,
        device_id=1,
    )
    assert trt == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path),
        "trt_profile_min_shapes": "features:1x16,mask:1x4x2",
        "trt_profile_opt_shapes": "features:8x16,mask:8x4x2",
        "trt_profile_max_shapes": "features:32x16,mask:32x4x2",
    }
    assert cuda == {"device_id": "1"}
    assert cpu == {}


def test_provider_profiles_default_to_the_largest_batch_and_skip_unnamable_inputs() -> None:
    (trt,) = ort_provider_options(
        ["TensorrtExecutionProvider"], inputs={"features": ("N", 16)}, max_batch_size=4
    )
    assert trt["trt_profile_opt_shapes"] == "features:4x16"
    assert trt["trt_fp16_enable"] == "False"
    assert "trt_engine_cache_enable" not in trt  # no cache directory, no cache
    for inputs in ({"image": ("N", 3, "H", "W")}, {"a:b": ("N", 2)}, {"fixed": (2, 16)}):
        (trt,) = ort_provider_options(
            ["TensorrtExecutionProvider"], inputs=inputs, max_batch_size=4
        )
        assert not any(k.startswith("trt_profile") for k in trt), inputs


def test_provider_options_refuse_impossible_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        ort_provider_options([], inputs={}, max_batch_size=0)
    with pytest.raises(ValueError, match=r"opt_batch_size must lie in 1..8"):
        ort_provider_options([], inputs={}, max_batch_size=8, opt_batch_size=9)
    with pytest.raises(ValueError, match="device_id must be 0 or more"):
        ort_provider_options([], inputs={}, max_batch_size=8, device_id=-1)


def test_gpu_providers_missing_from_this_build_fall_back_to_the_cpu_and_still_answer(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime build has GPU providers")
    with (
        caplog.at_level("WARNING", "fogline.cloud.backends"),
        pytest.warns(UserWarning, match="not in available provider names"),
    ):
        backend = OnnxRuntimeBackend(
            tiny_bundle / "cloud.onnx",
            providers=list(choose_providers(ALL_PROVIDERS)),
            engine_cache_dir=tmp_path / "engines",
            fp16=True,
            max_batch_size=4,
        )
    assert backend.providers == ("CPUExecutionProvider",)
    assert "could not start TensorrtExecutionProvider, CUDAExecutionProvider" in caplog.text
    # the provider's cache folder is keyed by the onnxruntime (and TensorRT) version
    (folder,) = (tmp_path / "engines" / "onnxruntime").iterdir()
    assert folder.name.startswith(f"ort-{ort.__version__}-trt-")
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(
        backend.run({"features": x})["probs"], reference(tiny_bundle / "cloud.onnx", x), rtol=1e-6
    )


def test_asking_only_for_the_cpu_creates_no_engine_cache(tiny_bundle: Path, tmp_path: Path) -> None:
    choice = BackendChoice("onnxruntime", "test", ("CPUExecutionProvider",))
    backend = choice.load(
        tiny_bundle / "cloud.onnx", max_batch_size=4, engine_cache_dir=tmp_path / "engines"
    )
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.providers == ("CPUExecutionProvider",)
    assert not (tmp_path / "engines").exists()


def host(
    *,
    tensorrt: str | None = "the tensorrt package is not installed",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    cuda: str | None = None,
    torch_cuda: str | None = "the torch package is not installed",
) -> Availability:
    return Availability(
        tensorrt_problem=tensorrt,
        providers=providers,
        cuda_device=cuda,
        torch_cuda_problem=torch_cuda,
    )


def test_auto_takes_native_tensorrt_wherever_it_can_run() -> None:
    choice = select_backend("auto", availability=host(tensorrt=None, cuda="NVIDIA L4"))
    assert choice.kind == "tensorrt"
    assert "NVIDIA L4" in choice.reason


def test_auto_takes_onnxruntime_gpu_providers_when_only_they_can_run() -> None:
    choice = select_backend(
        "auto",
        availability=host(
            tensorrt="the tensorrt package is not installed",
            providers=ALL_PROVIDERS,
            cuda="NVIDIA L4",
        ),
    )
    assert choice.kind == "onnxruntime"
    assert choice.providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert "native TensorRT unavailable (the tensorrt package is not installed)" in choice.reason


def test_auto_leaves_gpu_providers_out_without_a_device_and_says_so() -> None:
    choice = select_backend(
        "auto", availability=host(tensorrt="no CUDA device", providers=ALL_PROVIDERS)
    )
    assert choice.providers == ("CPUExecutionProvider",)
    assert (
        "TensorrtExecutionProvider, CUDAExecutionProvider left out: no CUDA device visible"
        in choice.reason
    )


def test_a_configured_backend_is_honoured_or_refused_with_the_reason() -> None:
    gpu_host = host(providers=ALL_PROVIDERS, cuda="NVIDIA L4")
    choice = select_backend("onnxruntime", availability=gpu_host)
    assert (choice.kind, choice.providers[0]) == ("onnxruntime", "TensorrtExecutionProvider")
    assert select_backend("tensorrt", availability=host(tensorrt=None, cuda="L4")).kind == (
        "tensorrt"
    )
    with pytest.raises(BackendError, match="requested but unavailable: no CUDA device"):
        select_backend("tensorrt", availability=host(tensorrt="no CUDA device"))


def test_auto_takes_torch_on_cuda_when_native_tensorrt_cannot_run() -> None:
    choice = select_backend(
        "auto", availability=host(providers=ALL_PROVIDERS, cuda="NVIDIA H200", torch_cuda=None)
    )
    assert (choice.kind, choice.device) == ("torch", "cuda")
    assert "native TensorRT unavailable" in choice.reason
    assert "torch sees CUDA device NVIDIA H200" in choice.reason


def test_auto_still_prefers_native_tensorrt_over_torch() -> None:
    both = host(tensorrt=None, cuda="NVIDIA L4", torch_cuda=None)
    assert select_backend("auto", availability=both).kind == "tensorrt"


def test_torch_asked_for_by_name_runs_on_cuda_or_else_on_the_cpu() -> None:
    on_gpu = select_backend("torch", availability=host(cuda="NVIDIA H200", torch_cuda=None))
    assert (on_gpu.kind, on_gpu.device) == ("torch", "cuda")
    on_cpu = select_backend("torch", availability=host(torch_cuda="no NVIDIA driver on this host"))
    assert (on_cpu.kind, on_cpu.device) == ("torch", "cpu")
    assert "on the CPU (no NVIDIA driver on this host)" in on_cpu.reason


def test_warmup_shapes_fill_symbolic_axes() -> None:
    assert dummy_shape(["N", 16], 8) == (8, 16)
    assert dummy_shape([-1, 3, "H", 7], 2) == (2, 3, 1, 7)


def cuda_and_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(
    cuda_and_tensorrt() or torch_cuda(), reason="this host can run TensorRT or torch on CUDA"
)
def test_auto_falls_back_to_onnxruntime_and_says_why() -> None:
    choice = select_backend("auto")
    assert choice.kind == "onnxruntime"
    assert "TensorRT unavailable" in choice.reason
    with pytest.raises(BackendError, match="TensorRT backend requested but unavailable"):
        select_backend("tensorrt")


def test_onnxruntime_can_be_asked_for_by_name() -> None:
    assert select_backend("onnxruntime").kind == "onnxruntime"
    with pytest.raises(ValueError, match="auto, onnxruntime, tensorrt or torch"):
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
