"""Native TensorRT backend: the engine cache, precision planning, FP16 conversion and profile
shapes run on the CPU here; building and running engines needs tensorrt and a CUDA device
(marked ``gpu``, skipped elsewhere)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fogline.cloud_service import BackendError
from fogline.cloud_service._tensorrt import (
    EngineCache,
    convert_onnx_to_fp16,
    engine_cache_key,
    fp16_problem,
    plan_precision,
    profile_shapes,
    trt_major,
)

# --- the engine cache, with the build and TensorRT's deserializer faked ---------------


class FakeTensorRT:
    """Stands in for a builder and ``Runtime.deserialize_cuda_engine``: a plan is any bytes
    starting with ``PLAN``; the engine is the plan's text; anything else is refused."""

    def __init__(self) -> None:
        self.builds = 0
        self.refuse: set[bytes] = set()

    def build(self) -> tuple[bytes, dict[str, Any]]:
        self.builds += 1
        return f"PLAN-{self.builds}".encode(), {"precision": "fp16", "gpu": "Fake GPU"}

    def deserialize(self, plan: bytes) -> str | None:
        if plan in self.refuse or not plan.startswith(b"PLAN"):
            return None
        return plan.decode()


@pytest.fixture
def fake() -> FakeTensorRT:
    return FakeTensorRT()


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


KEY = engine_cache_key(b"model", "10.9.0", "Fake GPU", 8, True)


def test_a_built_engine_is_cached_and_reused_without_rebuilding(
    cache: EngineCache, fake: FakeTensorRT
) -> None:
    first = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert (first.engine, first.from_cache) == ("PLAN-1", False)
    assert first.path == cache.path(KEY)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o644
    again = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert (again.engine, again.from_cache, fake.builds) == ("PLAN-1", True, 1)
    assert again.meta["precision"] == "fp16"
    assert again.meta["key"] == KEY
    assert again.meta["plan_sha256"] == hashlib.sha256(b"PLAN-1").hexdigest()
    assert [p.name for p in cache.directory.iterdir()] == [f"{KEY}.engine"]  # no temp files


def corrupt_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_last_byte, "checksum mismatch"),
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "not a fogline engine file"),
        (lambda p: p.write_bytes(b"PLAN-raw-from-elsewhere"), "not a fogline engine file"),
    ],
    ids=["flipped-byte", "truncated-plan", "truncated-header", "foreign-file"],
)
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(
    cache: EngineCache,
    fake: FakeTensorRT,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    damage(cache.path(KEY))
    with caplog.at_level(logging.WARNING, "fogline.cloud.tensorrt"):
        loaded = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert (loaded.engine, loaded.from_cache, fake.builds) == ("PLAN-2", False, 2)
    assert reason in caplog.text
    assert "rebuilding" in caplog.text
    assert cache.read(KEY) == (b"PLAN-2", cache.read(KEY)[1])  # repaired on disk


def test_an_engine_built_for_another_key_is_not_used(
    cache: EngineCache, fake: FakeTensorRT, caplog: pytest.LogCaptureFixture
) -> None:
    other = engine_cache_key(b"model", "10.9.0", "Other GPU", 8, True)
    cache.load_or_build(other, build=fake.build, deserialize=fake.deserialize)
    cache.path(other).rename(cache.path(KEY))  # e.g. copied from another host by hand
    with caplog.at_level(logging.WARNING, "fogline.cloud.tensorrt"):
        loaded = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert not loaded.from_cache
    assert "its key does not match" in caplog.text


def test_a_cached_engine_tensorrt_refuses_is_rebuilt(
    cache: EngineCache, fake: FakeTensorRT, caplog: pytest.LogCaptureFixture
) -> None:
    cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    fake.refuse.add(b"PLAN-1")  # e.g. a driver update TensorRT notices on load
    with caplog.at_level(logging.WARNING, "fogline.cloud.tensorrt"):
        loaded = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert (loaded.engine, loaded.from_cache) == ("PLAN-2", False)
    assert "TensorRT refused the cached engine" in caplog.text


def test_a_deserializer_that_raises_counts_as_a_refusal(
    cache: EngineCache, fake: FakeTensorRT
) -> None:
    cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)

    def raising(plan: bytes) -> str | None:
        if plan == b"PLAN-1":
            raise RuntimeError("Serialization assertion failed")
        return fake.deserialize(plan)

    loaded = cache.load_or_build(KEY, build=fake.build, deserialize=raising)
    assert loaded.engine == "PLAN-2"


def test_an_unwritable_cache_costs_a_rebuild_not_a_failure(
    tmp_path: Path, fake: FakeTensorRT, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = EngineCache(blocker / "engines")
    with caplog.at_level(logging.WARNING, "fogline.cloud.tensorrt"):
        loaded = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
        again = cache.load_or_build(KEY, build=fake.build, deserialize=fake.deserialize)
    assert (loaded.engine, again.engine, fake.builds) == ("PLAN-1", "PLAN-2", 2)
    assert "cannot write the TensorRT engine cache" in caplog.text


def test_an_engine_that_does_not_load_right_after_its_build_is_an_error(
    cache: EngineCache,
) -> None:
    with pytest.raises(BackendError, match="could not load the engine it had just built"):
        cache.load_or_build(KEY, build=lambda: (b"garbage", {}), deserialize=lambda _: None)
    assert not cache.path(KEY).exists()


def test_writers_racing_on_one_key_leave_one_whole_file(
    cache: EngineCache, fake: FakeTensorRT
) -> None:
    plans = [f"PLAN-{i}".encode() * 1000 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda plan: cache.write(KEY, plan, {}), plans))
    plan, _ = cache.read(KEY)  # type: ignore[misc]
    assert plan in plans
    assert [p.name for p in cache.directory.iterdir()] == [f"{KEY}.engine"]


def test_the_cache_key_covers_the_optimization_profiles() -> None:
    assert engine_cache_key(b"m", "10.9", "L4", 32, False) == engine_cache_key(
        b"m", "10.9", "L4", 32, False, opt_batch_size=32
    )
    assert engine_cache_key(b"m", "10.9", "L4", 32, False) != engine_cache_key(
        b"m", "10.9", "L4", 32, False, opt_batch_size=8
    )
    assert engine_cache_key(b"m", "10.9", "L4", 32, False) != engine_cache_key(
        b"m", "10.9", "L4", 32, False, profiles=2
    )


# --- precision with TensorRT 10 and 11 --------------------------------------------------


@pytest.mark.parametrize(
    ("fp16", "version", "flag", "fast", "method"),
    [
        (False, "10.9.0", True, True, "none"),
        (True, "10.9.0", True, True, "builder-flag"),
        (True, "10.9.0", True, None, "builder-flag"),
        (True, "10.9.0", True, False, "none"),  # no fast FP16 on this GPU
        (True, "10.9.0", False, None, "none"),  # a build without the FP16 flag
        (True, "11.2.1.2", False, None, "onnx-fp16"),
        (True, "11.0.0", True, True, "onnx-fp16"),  # strongly typed even if a flag lingers
        (True, "custom", False, None, "onnx-fp16"),
        (False, "11.2.1.2", False, None, "none"),
    ],
)
def test_fp16_is_obtained_the_way_the_installed_tensorrt_allows(
    fp16: bool, version: str, flag: bool, fast: bool | None, method: str
) -> None:
    plan = plan_precision(fp16, trt_version=version, has_fp16_flag=flag, platform_fast_fp16=fast)
    assert plan.method == method
    assert plan.label == ("fp32" if method == "none" else "fp16")
    assert plan.note


def test_tensorrt_major_versions_are_read_from_version_strings() -> None:
    assert trt_major("11.2.1.2") == 11
    assert trt_major("10.16.1.11") == 10
    assert trt_major("custom-build") is None


def test_the_cloud_model_converts_to_fp16_with_fp32_inputs_and_outputs(tiny_bundle: Path) -> None:
    model = tiny_bundle / "cloud.onnx"
    converted = onnx.load_from_string(convert_onnx_to_fp16(model.read_bytes()))
    onnx.checker.check_model(converted)
    io = [*converted.graph.input, *converted.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    assert {i.data_type for i in converted.graph.initializer} == {TensorProto.FLOAT16}
    x = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    (fp32,) = ort.InferenceSession(str(model)).run(None, {"features": x})
    (fp16,) = ort.InferenceSession(converted.SerializeToString()).run(None, {"features": x})
    assert fp16.dtype == np.float32
    np.testing.assert_allclose(fp16, fp32, atol=1e-2)


def matmul_model(weights: np.ndarray, *, qdq: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(weights, "w")]
    if qdq:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            helper.make_node("MatMul", ["xd", "w"], ["y"]),
        ]
        inits += [
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_models_that_fp16_would_change_are_left_in_fp32() -> None:
    assert fp16_problem(matmul_model(np.eye(2, dtype=np.float32))) is None
    huge = matmul_model(np.full((2, 2), 1e6, np.float32))
    assert "beyond FP16's range" in str(fp16_problem(huge))
    quantized = matmul_model(np.eye(2, dtype=np.float32), qdq=True)
    assert "explicit quantization (DequantizeLinear, QuantizeLinear)" in str(
        fp16_problem(quantized)
    )
    with pytest.raises(BackendError, match="FP16 conversion skipped"):
        convert_onnx_to_fp16(huge.SerializeToString())


def test_bytes_that_are_not_onnx_cannot_be_converted() -> None:
    with pytest.raises(BackendError, match="not a readable ONNX file"):
        convert_onnx_to_fp16(b"\x00not onnx at all")


# --- optimization profiles ----------------------------------------------------------------


def test_the_profile_spans_the_batch_range_and_pins_other_axes() -> None:
    assert profile_shapes("features", (-1, 16), 32, 16) == ((1, 16), (16, 16), (32, 16))
    assert profile_shapes("image", (-1, 3, 8, 8), 4, 4) == (
        (1, 3, 8, 8),
        (4, 3, 8, 8),
        (4, 3, 8, 8),
    )
    assert profile_shapes("scalar", (), 8, 8) == ((), (), ())
    assert profile_shapes("one", (1, 16), 1, 1) == ((1, 16), (1, 16), (1, 16))


def test_profiles_refuse_what_the_engine_could_not_serve() -> None:
    with pytest.raises(BackendError, match=r"dynamic axes \[2, 3\] besides the batch axis"):
        profile_shapes("image", (-1, 3, -1, -1), 8, 8)
    with pytest.raises(BackendError, match=r"fixed batch axis of 1; batches of 1\.\.8"):
        profile_shapes("features", (1, 16), 8, 8)


# --- on a GPU -----------------------------------------------------------------------------


def cuda_and_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


gpu = pytest.mark.skipif(not cuda_and_tensorrt(), reason="needs tensorrt and a CUDA device")


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    (out,) = ort.InferenceSession(str(model)).run(["probs"], {"features": x})
    return np.asarray(out)


@pytest.mark.gpu
@gpu
def test_an_fp32_engine_matches_onnxruntime_over_the_batch_range(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fogline.cloud_service._tensorrt import TensorRTBackend

    model = tiny_bundle / "cloud.onnx"
    backend = TensorRTBackend(model, max_batch_size=8, cache_dir=tmp_path, execution_contexts=2)
    backend.warmup()
    assert backend.precision == "fp32"
    assert not backend.engine_from_cache
    for n in (1, 3, 8):
        x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
        out = backend.run({"features": x})["probs"]
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, reference(model, x), atol=5e-3)
    with pytest.raises(BackendError, match=r"outside the engine's range 1..8"):
        backend.run({"features": np.zeros((9, 16), np.float32)})


@pytest.mark.gpu
@gpu
def test_a_corrupted_engine_file_is_rebuilt_on_the_gpu(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fogline.cloud_service._tensorrt import TensorRTBackend

    model = tiny_bundle / "cloud.onnx"
    first = TensorRTBackend(model, max_batch_size=4, cache_dir=tmp_path)
    corrupt_last_byte(first.engine_path)
    with caplog.at_level(logging.WARNING, "fogline.cloud.tensorrt"):
        again = TensorRTBackend(model, max_batch_size=4, cache_dir=tmp_path)
    assert not again.engine_from_cache
    assert "checksum mismatch" in caplog.text
    third = TensorRTBackend(model, max_batch_size=4, cache_dir=tmp_path)
    assert third.engine_from_cache
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(third.run({"features": x})["probs"], reference(model, x), atol=5e-3)


@pytest.mark.gpu
@gpu
def test_an_fp16_engine_stays_close_to_fp32_and_is_cached_apart(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fogline.cloud_service._tensorrt import TensorRTBackend

    model = tiny_bundle / "cloud.onnx"
    fp32 = TensorRTBackend(model, max_batch_size=8, cache_dir=tmp_path)
    fp16 = TensorRTBackend(model, max_batch_size=8, cache_dir=tmp_path, fp16=True)
    assert fp16.engine_path != fp32.engine_path
    assert fp16.precision == "fp16"
    x = np.random.default_rng(7).standard_normal((8, 16)).astype(np.float32)
    out = fp16.run({"features": x})["probs"]
    assert out.dtype == np.float32  # inputs and outputs stay FP32 on TensorRT 10 and 11
    np.testing.assert_allclose(out, reference(model, x), atol=2e-2)


@pytest.mark.gpu
@gpu
def test_concurrent_batches_on_a_context_pool_all_get_their_own_answers(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from fogline.cloud_service._tensorrt import TensorRTBackend

    model = tiny_bundle / "cloud.onnx"
    backend = TensorRTBackend(model, max_batch_size=16, cache_dir=tmp_path, execution_contexts=3)
    backend.warmup()
    assert backend.max_concurrent_batches == 3
    start = threading.Barrier(6)

    def one(seed: int) -> None:
        rng = np.random.default_rng(seed)
        start.wait(10)
        for _ in range(20):
            x = rng.standard_normal((int(rng.integers(1, 17)), 16)).astype(np.float32)
            np.testing.assert_allclose(
                backend.run({"features": x})["probs"], reference(model, x), atol=5e-3
            )

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(one, s) for s in range(6)]:
            future.result()
