"""The cloud side: one data plane, the model repository (:class:`ModelRepository`: bundles'
cloud parts and Triton-layout models, one batcher per model version, onnxruntime or
TensorRT), with thin adapters over it: the MQTT worker (features in, results back to each
site and into a result store, and a small HTTP API ``/v1/results/{site}/{id}``,
``/healthz``, ``/readyz``, ``/metrics``) and the Open Inference Protocol API.

:class:`CloudWorker` runs in-process (``start()`` / ``stop()``); :func:`create_app` is
the HTTP API over one; ``fogline cloud serve --config cloud.toml`` runs both as a service.

Bundles on demand: a worker given a :class:`BundleSource` (:class:`CatalogueSource`, over
a local catalogue) loads the versions messages name, and with ``wanted``
(:func:`director_wanted`, :func:`fleet_wanted`, :func:`union_wanted`) keeps the versions
sites run loaded and unloads the others (:class:`LoadPolicy`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fogline.cloud_service.errors import (
    BackendError,
    BrokerError,
    BundleNotReleasedError,
    BundleSourceError,
    CloudDataError,
    CloudError,
    CloudServiceError,
    ConfigError,
    DeadlineExceededError,
    InferenceInputError,
    ModelNotReadyError,
    QueueFullError,
    StoreCorruptError,
    StoreError,
    UnknownBundleError,
    UnknownModelError,
)

if TYPE_CHECKING:
    from fogline.cloud_service._app import create_app
    from fogline.cloud_service._backends import (
        Backend,
        BackendChoice,
        OnnxRuntimeBackend,
        select_backend,
    )
    from fogline.cloud_service._bundle_loads import LoadPlan, LoadPolicy
    from fogline.cloud_service._bundle_source import (
        BundleSource,
        CatalogueSource,
        director_wanted,
        fleet_wanted,
        union_wanted,
    )
    from fogline.cloud_service._config import (
        BatchingConfig,
        CloudConfig,
        HttpConfig,
        LaneConfig,
        LaneConfigs,
        ModelConfig,
        StoreConfig,
        SyncConfig,
        TensorRTConfig,
        VersionPolicy,
    )
    from fogline.cloud_service._metrics import CloudMetrics
    from fogline.cloud_service._repository import ModelRepository
    from fogline.cloud_service._serving import Lane, ModelMetadata, ModelProvider, TensorSpec
    from fogline.cloud_service._store import ResultStore, StoredResult
    from fogline.cloud_service._worker import CloudWorker

# The package is imported by ``fogline --help`` (through its command module); onnxruntime, FastAPI
# and SQLAlchemy load only when one of these names is first used.
_LAZY = {
    "create_app": "_app",
    "Backend": "_backends",
    "BackendChoice": "_backends",
    "OnnxRuntimeBackend": "_backends",
    "select_backend": "_backends",
    "LoadPlan": "_bundle_loads",
    "LoadPolicy": "_bundle_loads",
    "BundleSource": "_bundle_source",
    "CatalogueSource": "_bundle_source",
    "director_wanted": "_bundle_source",
    "fleet_wanted": "_bundle_source",
    "union_wanted": "_bundle_source",
    "BatchingConfig": "_config",
    "CloudConfig": "_config",
    "HttpConfig": "_config",
    "StoreConfig": "_config",
    "SyncConfig": "_config",
    "TensorRTConfig": "_config",
    "LaneConfig": "_config",
    "LaneConfigs": "_config",
    "ModelConfig": "_config",
    "VersionPolicy": "_config",
    "ModelRepository": "_repository",
    "Lane": "_serving",
    "ModelMetadata": "_serving",
    "ModelProvider": "_serving",
    "TensorSpec": "_serving",
    "CloudMetrics": "_metrics",
    "ResultStore": "_store",
    "StoredResult": "_store",
    "CloudWorker": "_worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
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
]
