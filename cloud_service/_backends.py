"""Inference backends for a bundle's cloud part, behind one small interface.

Two implementations: onnxruntime (CPU, or its CUDA / TensorRT execution providers when
the installed build has them) and native TensorRT (:mod:`._tensorrt`). :func:`select_backend`
picks one and records why, so a worker can say which it runs and why not the other.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from fogline.cloud_service.errors import BackendError

__all__ = [
    "Backend",
    "BackendChoice",
    "OnnxRuntimeBackend",
    "choose_providers",
    "select_backend",
]

log = logging.getLogger("fogline.cloud.backends")

# Best first. onnxruntime falls back along the list for operators a provider lacks.
_PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

_ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}


@runtime_checkable
class Backend(Protocol):
    """Runs one cloud model on a batch. ``run`` takes arrays whose first axis is the batch
    and casts them to the model's input types itself."""

    @property
    def name(self) -> str: ...

    @property
    def input_names(self) -> tuple[str, ...]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def warmup(self) -> None: ...


def choose_providers(available: Sequence[str]) -> list[str]:
    """The execution providers to ask onnxruntime for, best first; CPU always last."""
    chosen = [p for p in _PREFERRED_PROVIDERS if p in available]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def dummy_shape(shape: Sequence[Any], batch: int) -> tuple[int, ...]:
    """A concrete shape for warm-up: the batch axis set to ``batch``, other symbolic axes 1."""
    return tuple(
        batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(shape)
    )


class OnnxRuntimeBackend:
    """An onnxruntime session over the cloud model."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int = 1,
        max_batch_size: int = 32,
        providers: Sequence[str] | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the cores the broker and the MQTT threads need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        chosen = list(providers or choose_providers(ort.get_available_providers()))
        try:
            self._session = ort.InferenceSession(str(model_path), opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        inputs = self._session.get_inputs()
        self._input_names = tuple(i.name for i in inputs)
        self._input_shapes = {i.name: tuple(i.shape) for i in inputs}
        self._input_dtypes = {i.name: _ORT_TYPES.get(i.type, np.dtype(np.float32)) for i in inputs}
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())
        self._max_batch_size = max_batch_size

    @property
    def name(self) -> str:
        return "onnxruntime"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {
            name: np.asarray(inputs[name], dtype=self._input_dtypes[name])
            for name in self._input_names
        }
        try:
            outs = self._session.run(None, feed)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime run failed: {exc}") from exc
        return dict(zip(self.output_names, outs, strict=True))

    def warmup(self) -> None:
        """Run the smallest and the largest batch once, so the first real batch is fast."""
        for batch in sorted({1, self._max_batch_size}):
            self.run(
                {
                    n: np.zeros(dummy_shape(self._input_shapes[n], batch), self._input_dtypes[n])
                    for n in self._input_names
                }
            )


@dataclass(frozen=True)
class BackendChoice:
    """Which backend to use and why (``reason`` is shown in logs and ``/readyz``)."""

    kind: Literal["onnxruntime", "tensorrt"]
    reason: str

    def load(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int = 32,
        threads: int = 1,
        engine_cache_dir: Path | None = None,
        fp16: bool = False,
    ) -> Backend:
        """Load ``model_path`` into this backend (TensorRT builds or reuses a cached engine)."""
        if self.kind == "tensorrt":
            from fogline.cloud_service._tensorrt import TensorRTBackend

            return TensorRTBackend(
                model_path, max_batch_size=max_batch_size, cache_dir=engine_cache_dir, fp16=fp16
            )
        return OnnxRuntimeBackend(model_path, threads=threads, max_batch_size=max_batch_size)


def _tensorrt_unavailable() -> str | None:
    """Why native TensorRT cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. CUDA libraries missing
        return f"tensorrt does not import: {exc}"
    try:
        import torch
    except (ImportError, OSError, RuntimeError) as exc:
        return f"torch (needed for CUDA buffers) does not import: {exc}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def select_backend(requested: str = "auto") -> BackendChoice:
    """Pick a backend: ``"auto"`` takes TensorRT when it imports and CUDA is present,
    otherwise onnxruntime, and records the reason either way.

    Asking for ``"tensorrt"`` where it cannot run raises :class:`BackendError`.
    """
    if requested not in ("auto", "onnxruntime", "tensorrt"):
        raise ValueError(f"backend {requested!r} must be auto, onnxruntime or tensorrt")
    if requested == "onnxruntime":
        return BackendChoice("onnxruntime", "requested in the configuration")
    why_not = _tensorrt_unavailable()
    if requested == "tensorrt":
        if why_not is not None:
            raise BackendError(f"TensorRT backend requested but unavailable: {why_not}")
        return BackendChoice("tensorrt", "requested in the configuration")
    if why_not is None:
        return BackendChoice("tensorrt", "tensorrt imports and a CUDA device is available")
    providers = choose_providers(ort.get_available_providers())
    return BackendChoice(
        "onnxruntime", f"native TensorRT unavailable ({why_not}); providers {', '.join(providers)}"
    )
