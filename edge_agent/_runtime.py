"""The edge model in an onnxruntime session: load, check against the bundle, warm up, run.

onnxruntime raises its own exception classes (not subclasses of anything in the standard
library); the distribution's one map of them (:func:`fogline.compression.onnxruntime_errors`)
turns them into :class:`ModelError` (the model cannot be used) or :class:`InputError` (this
input cannot be run).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from fogline.compression import onnxruntime_errors
from fogline.edge_agent.errors import InputError, ModelError
from fogline.sync import Bundle

__all__ = ["EdgeRuntime", "InputSpec"]

log = logging.getLogger("fogline.edge_agent")

_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class InputSpec:
    """The edge model's input: name, dtype and the shape of one item (``None``: any size)."""

    name: str
    dtype: np.dtype[Any]
    item_shape: tuple[int | None, ...]

    @property
    def item_nbytes(self) -> int | None:
        """Bytes of one raw item, when every dimension is fixed."""
        if any(d is None for d in self.item_shape):
            return None
        return math.prod(d for d in self.item_shape if d is not None) * self.dtype.itemsize

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.item_shape)
        return f"[{dims}] {self.dtype}"

    def cast(self, arr: np.ndarray, what: str = "input") -> np.ndarray:
        """``arr`` in the model's dtype, refusing casts that would change values silently."""
        src, dst = arr.dtype, self.dtype
        if src == dst:
            return arr
        if np.can_cast(src, dst, "safe"):
            return arr.astype(dst)
        if dst.kind in "iu" and src.kind in "iub":
            info = np.iinfo(dst)
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise InputError(
                    f"{what} values lie outside the range of {dst} ({info.min}..{info.max})"
                )
            return arr.astype(dst)
        if dst.kind == "f" and src.kind in "iubf":
            return arr.astype(dst)
        raise InputError(f"{what} has dtype {src}; the model takes {dst}")

    def _fit(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The item shape ``shape`` stands for, or None if it does not fit."""
        want = self.item_shape
        if len(shape) == len(want) and all(
            w is None or w == s for w, s in zip(want, shape, strict=True)
        ):
            return shape
        if any(w is None for w in want):
            return None
        # Leading/trailing size-1 dims may be left out or added: (8, 8) fits (1, 8, 8).
        if tuple(d for d in shape if d != 1) == tuple(w for w in want if w != 1):
            return tuple(w for w in want if w is not None)
        return None

    def item(self, sample: Any) -> np.ndarray:
        """One sample as an array of the model's item shape and dtype."""
        arr = sample if isinstance(sample, np.ndarray) else np.asarray(sample)
        shape = self._fit(arr.shape)
        if shape is None:
            raise InputError(
                f"input shape {list(arr.shape)} does not match the model input {self.describe()}"
            )
        return self.cast(arr.reshape(shape))

    def batch(self, samples: Any) -> np.ndarray:
        """A batch (first axis = items) as an array of the model's dtype."""
        arr = samples if isinstance(samples, np.ndarray) else np.asarray(samples)
        if arr.ndim == 0:
            raise InputError("a batch needs a leading axis of items")
        shape = self._fit(arr.shape[1:])
        if shape is None:
            raise InputError(
                f"batch shape {list(arr.shape)} does not match [N] + the model input "
                f"{self.describe()}"
            )
        return self.cast(arr.reshape((arr.shape[0], *shape)), "batch")


class EdgeRuntime:
    """The bundle's edge model in a CPU onnxruntime session.

    Construction loads the session and checks that the input and every output the bundle
    declares exist; :meth:`warm_up` runs it a few times at batch 1 and ``max_batch`` so the
    first real request does not pay for allocation and kernel selection.
    """

    def __init__(
        self, bundle: Bundle, *, threads: int = 1, max_batch: int = 32, warmup_runs: int = 3
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.bundle = bundle
        self.max_batch = max_batch
        self.warmup_runs = warmup_runs
        self._ready = False
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        path = bundle.edge_model_path
        with onnxruntime_errors(
            into=ModelError, what=f"edge model {path.name} of {bundle.id} does not load"
        ):
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        spec = bundle.edge
        inputs = {i.name: i for i in self.session.get_inputs()}
        if spec.input not in inputs:
            raise ModelError(
                f"edge model of {bundle.id} has no input {spec.input!r} (it has {sorted(inputs)})"
            )
        others = sorted(set(inputs) - {spec.input})
        if others:
            raise ModelError(
                f"edge model of {bundle.id} needs inputs {others} besides {spec.input!r}; "
                "the agent feeds only the bundle's declared input"
            )
        wanted = [*spec.feature_outputs]
        wanted += [o for o in (spec.filter_output, spec.exit_output) if o is not None]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [o for o in wanted if o not in outputs]
        if missing:
            raise ModelError(
                f"edge model of {bundle.id} lacks declared outputs {missing} "
                f"(it has {sorted(outputs)})"
            )
        if not spec.feature_outputs:
            raise ModelError(f"bundle {bundle.id} declares no feature outputs")
        self.output_names: list[str] = list(dict.fromkeys(wanted))
        node = inputs[spec.input]
        dtype = _ORT_DTYPES.get(node.type)
        if dtype is None:
            raise ModelError(f"edge model input {spec.input!r} has unsupported type {node.type}")
        shape = list(node.shape) if node.shape else []
        if not shape:
            raise ModelError(f"edge model input {spec.input!r} has no batch axis")
        batch_dim = shape[0]
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        item = tuple(d if isinstance(d, int) and d > 0 else None for d in shape[1:])
        self.input = InputSpec(spec.input, dtype, item)

    @property
    def ready(self) -> bool:
        """True once warmed up."""
        return self._ready

    def warm_up(self) -> None:
        """Run a few batches of zeros at batch 1 and ``max_batch``, then report ready."""
        item = tuple(1 if d is None else d for d in self.input.item_shape)
        sizes = sorted({1, self.max_batch})
        for size in sizes:
            frames = np.zeros((size, *item), dtype=self.input.dtype)
            for _ in range(self.warmup_runs):
                self.run(frames)
        self._ready = True
        log.debug("edge model of %s warmed up at batch sizes %s", self.bundle.id, sizes)

    def run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (already in the model's dtype and item shape); outputs by name."""
        n = frames.shape[0]
        step = self._fixed_batch or self.max_batch
        if n <= step and self._fixed_batch in (None, n):
            return self._run(frames)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, step):
            chunk = frames[start : start + step]
            got = len(chunk)
            if self._fixed_batch is not None and got < step:
                pad = np.zeros((step - got, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self._run(chunk)
            parts.append({k: v[:got] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    def _run(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        with onnxruntime_errors(into=InputError, what="the edge model could not run this input"):
            outs = self.session.run(self.output_names, {self.input.name: frames})
        return dict(zip(self.output_names, outs, strict=True))

    def describe(self) -> Mapping[str, Any]:
        return {
            "input": self.input.name,
            "shape": list(self.input.item_shape),
            "dtype": str(self.input.dtype),
            "outputs": list(self.output_names),
        }
