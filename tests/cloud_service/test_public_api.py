"""The package's public surface, and metrics that stay per worker."""

from __future__ import annotations

import subprocess
import sys

import fogline.cloud_service as cloud
from fogline.cloud_service import CloudMetrics


def test_the_public_names_are_pinned() -> None:
    assert cloud.__all__ == sorted(cloud.__all__)
    assert set(cloud.__all__) == {
        "Backend",
        "BackendChoice",
        "BackendError",
        "BatchingConfig",
        "BrokerError",
        "BundleNotReleasedError",
        "BundleSource",
        "BundleSourceError",
        "CatalogueSource",
        "CloudConfig",
        "CloudDataError",
        "CloudError",
        "CloudMetrics",
        "CloudServiceError",
        "CloudWorker",
        "ConfigError",
        "DeadlineExceededError",
        "HttpConfig",
        "InferenceInputError",
        "Lane",
        "LaneConfig",
        "LaneConfigs",
        "LoadPlan",
        "LoadPolicy",
        "ModelConfig",
        "ModelMetadata",
        "ModelNotReadyError",
        "ModelProvider",
        "ModelRepository",
        "OnnxRuntimeBackend",
        "QueueFullError",
        "ResultStore",
        "StoreConfig",
        "StoreCorruptError",
        "StoreError",
        "StoredResult",
        "SyncConfig",
        "TensorRTConfig",
        "TensorSpec",
        "UnknownBundleError",
        "UnknownModelError",
        "VersionPolicy",
        "create_app",
        "director_wanted",
        "fleet_wanted",
        "select_backend",
        "union_wanted",
    }
    for name in cloud.__all__:
        assert getattr(cloud, name) is not None


def test_errors_split_into_bad_data_and_failed_service() -> None:
    for err in (cloud.ConfigError, cloud.UnknownBundleError, cloud.BundleNotReleasedError):
        assert issubclass(err, cloud.CloudDataError)
        assert issubclass(err, ValueError)
    for err in (
        cloud.QueueFullError,
        cloud.BackendError,
        cloud.StoreError,
        cloud.BrokerError,
        cloud.BundleSourceError,
    ):
        assert issubclass(err, cloud.CloudServiceError)
        assert not issubclass(err, cloud.CloudDataError)
    assert issubclass(cloud.CloudDataError, cloud.CloudError)
    assert issubclass(cloud.CloudServiceError, cloud.CloudError)


def test_the_cli_module_does_not_import_the_heavy_dependencies() -> None:
    code = (
        "import sys, fogline._cli_cloud; "
        "print(sorted(m for m in ('onnxruntime', 'fastapi', 'sqlalchemy', 'torch') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_two_workers_metrics_live_in_separate_registries() -> None:
    a, b = CloudMetrics(), CloudMetrics()
    a.received.inc()
    a.rejected.labels("truncated").inc()
    assert a.value("fogline_cloud_received_total") == 1
    assert b.value("fogline_cloud_received_total") == 0
    assert b'fogline_cloud_rejected_total{reason="truncated"} 1.0' in a.render()
