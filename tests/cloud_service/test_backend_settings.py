"""Every backend setting reaches the backend, however the model was loaded: a bundle's
cloud part (the worker's own repository, or a repository given bundles) or a folder of a
Triton-layout model repository. The native TensorRT backend is replaced by a recorder
that runs the model on onnxruntime, so the check runs on any host."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fogline.cloud_service import (
    BackendChoice,
    CloudConfig,
    CloudWorker,
    ModelRepository,
    OnnxRuntimeBackend,
    TensorRTConfig,
)

TRT = TensorRTConfig(
    engine_cache_dir=Path("/nonexistent/engines"),
    fp16=True,
    device_id=3,
    execution_contexts=5,
    opt_batch_size=4,
)
EXPECTED = {
    "cache_dir": Path("/nonexistent/engines"),
    "fp16": True,
    "device_id": 3,
    "execution_contexts": 5,
    "opt_batch_size": 4,
}


class RecordingTensorRT:
    """Stands in for TensorRTBackend: records what it was built with, runs on onnxruntime."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model_path: str | Path, **kwargs: Any) -> None:
        RecordingTensorRT.built.append({"model_path": Path(model_path), **kwargs})
        self._inner = OnnxRuntimeBackend(model_path, max_batch_size=kwargs["max_batch_size"])

    @property
    def name(self) -> str:
        return "tensorrt"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inner.input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._inner.run(inputs)

    def warmup(self) -> None:
        self._inner.warmup()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import fogline.cloud_service._tensorrt as trt_module

    RecordingTensorRT.built = []
    monkeypatch.setattr(trt_module, "TensorRTBackend", RecordingTensorRT)
    return RecordingTensorRT.built


def _model_dir(root: Path, tiny_bundle: Path) -> Path:
    version = root / "plain" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes((tiny_bundle / "cloud.onnx").read_bytes())
    return root


def _settings(built: dict[str, Any]) -> dict[str, Any]:
    return {k: built[k] for k in EXPECTED}


def test_tensorrt_settings_reach_the_backend_for_bundles_and_repository_models(
    recorder: list[dict[str, Any]], tiny_bundle: Path, tmp_path: Path
) -> None:
    repo = ModelRepository(
        _model_dir(tmp_path / "models", tiny_bundle),
        bundles=(tiny_bundle,),
        backend=BackendChoice("tensorrt", "the test asks for it"),
        tensorrt=TRT,
    )
    repo.start()
    try:
        by_model = {b["model_path"]: b for b in recorder}
        assert set(by_model) == {
            tmp_path / "models" / "plain" / "1" / "model.onnx",
            tiny_bundle / "cloud.onnx",
        }
        for built in recorder:
            assert _settings(built) == EXPECTED
        assert repo.backend_name("tiny", "1") == "tensorrt"
    finally:
        repo.stop()


def test_tensorrt_settings_reach_the_backend_of_the_workers_own_repository(
    recorder: list[dict[str, Any]], cloud_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fogline.cloud_service._repository as repository_module

    # The worker picks its backend from its config; "tensorrt" is taken as available.
    monkeypatch.setattr(
        repository_module,
        "select_backend",
        lambda requested: BackendChoice("tensorrt", f"{requested} in the test"),
    )
    config: CloudConfig = cloud_config(backend="tensorrt", tensorrt=TRT)
    worker = CloudWorker(config)
    worker.start()
    try:
        assert len(recorder) == 1
        assert _settings(recorder[0]) == EXPECTED
        assert recorder[0]["max_batch_size"] == config.batching.max_batch_size
        assert worker.status()["backends"] == {"tiny@1": "tensorrt"}
    finally:
        worker.stop()
