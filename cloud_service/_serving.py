"""What the inference API needs from the models it serves, independent of any protocol.

The HTTP layer (Open Inference Protocol, :mod:`._oip` / :mod:`._oip_app`) talks only to a
:class:`ModelProvider`; the model repository with its per-model schedulers implements it.
Datatypes are named as the Open Inference Protocol names them (``FP32``, ``INT64``,
``BYTES`` …); shapes use ``-1`` for a dynamic axis and include the batch axis when the
model batches (``max_batch_size > 0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

__all__ = [
    "DATATYPES",
    "ORT_DATATYPES",
    "Lane",
    "ModelMetadata",
    "ModelProvider",
    "TensorSpec",
]

#: The numpy dtype that holds each protocol datatype (``BYTES``: ``object`` arrays).
DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

#: onnxruntime's type names (``NodeArg.type``) as protocol datatypes.
ORT_DATATYPES: Mapping[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class Lane(StrEnum):
    """Who is asking, which decides queueing priority. Each lane has its own queue and
    limits; a lower-priority lane can never starve a higher one (see docs/inference-api.md).

    ``INTERACTIVE``: direct HTTP requests, latency first. ``STREAM``: edge features arriving
    over MQTT. ``BULK``: offline scoring (``fogline cloud batch``), throughput first.
    """

    INTERACTIVE = "interactive"
    STREAM = "stream"
    BULK = "bulk"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, OIP datatype and shape (``-1`` = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What ``GET /v2/models/{model}[/versions/{v}]`` reports, plus the batching bound."""

    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    versions: tuple[str, ...] = field(default_factory=tuple)


class ModelProvider(Protocol):
    """The models behind an inference API.

    ``version=None`` means the model's default (highest ready) version. Errors (from
    :mod:`fogline.cloud_service.errors`): :class:`UnknownModelError` for a model or version
    not in the repository, :class:`ModelNotReadyError` while it loads or after it failed,
    :class:`InferenceInputError` for inputs that do not fit, :class:`QueueFullError` and
    :class:`DeadlineExceededError` when the model's lane cannot take or serve the request in
    time, :class:`BackendError` when the backend failed.
    """

    @property
    def ready(self) -> bool:
        """Every model that should be loaded is loaded and warmed up."""
        ...

    def model_names(self) -> list[str]: ...

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata: ...

    def is_ready(self, model: str, version: str | None = None) -> bool:
        """Raises :class:`UnknownModelError` for an unknown model or version."""
        ...

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request (arrays with the batch axis first when the model batches);
        return every output by name. The request may be batched with others."""
        ...
