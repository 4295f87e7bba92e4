"""Native TensorRT backend (TensorRT 10 and 11 Python API), torch CUDA tensors as buffers.

The engine is built from the bundle's ONNX cloud part with one optimization profile over
the batch range 1..max_batch_size and cached on disk under a key made of the model's
SHA-256, the TensorRT version, the GPU name, the precision asked for and the batch range,
because an engine is only valid for the exact library and device that built it. Each cache
file starts with a small header (what the engine was built for, the plan's SHA-256), so a
truncated, corrupted or misplaced file is noticed and rebuilt instead of handed to TensorRT.

Precision: TensorRT 11 removed weak typing (``BuilderFlag.FP16``/``INT8``, the INT8
calibrators, ``platform_has_fast_fp16``): every network is strongly typed and precision
comes from the ONNX itself. So ``fp16=True`` means the builder flag on TensorRT 10 (where
the GPU has fast FP16) and, on TensorRT 11, converting the ONNX to FP16 first (inputs and
outputs stay FP32), unless the model carries explicit Q/DQ precision or weights FP16 cannot
hold; then the engine stays FP32 and the log says why. The installed API is detected at
run time, not assumed from the version alone.

Concurrency: a small pool of execution contexts, each with its own CUDA stream, so batches
run by different threads overlap on the GPU instead of queueing on one context. Contexts
that run at the same time must not share an optimization profile when shapes are dynamic,
so the engine holds one identical profile per context (building takes longer accordingly).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import queue
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from fogline.cloud_service._backends import dummy_shape
from fogline.cloud_service._config import default_engine_cache_dir
from fogline.cloud_service.errors import BackendError

__all__ = [
    "EngineCache",
    "LoadedEngine",
    "Precision",
    "TensorRTBackend",
    "convert_onnx_to_fp16",
    "engine_cache_key",
    "fp16_problem",
    "plan_precision",
    "profile_shapes",
]

log = logging.getLogger("fogline.cloud.tensorrt")

STRONGLY_TYPED_MAJOR = 11  # TensorRT 11: strong typing only, no precision builder flags
_MAGIC = b"FOGLINE-TRT-ENGINE\x00"
_FORMAT = 1
_HEADER_LEN = struct.Struct(">I")
_FP16_MAX = 65504.0
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

E = TypeVar("E")


def engine_cache_key(
    model_bytes: bytes,
    trt_version: str,
    gpu_name: str,
    max_batch_size: int,
    fp16: bool,
    *,
    opt_batch_size: int | None = None,
    profiles: int = 1,
) -> str:
    """Everything an engine depends on, hashed into a file name (``profiles``: how many
    copies of the optimization profile it holds, one per execution context)."""
    opt = max_batch_size if opt_batch_size is None else opt_batch_size
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(model_bytes).digest())
    batch = f"batch=1..{max_batch_size}@{opt}x{profiles}"
    for part in (trt_version, gpu_name, batch, f"fp16={fp16}"):
        digest.update(b"\x00" + part.encode())
    return digest.hexdigest()


def trt_major(version: str) -> int | None:
    """``11`` from ``"11.2.1.2"``; None for a version string that does not start with one."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class Precision:
    """How an engine gets its precision: ``method`` is ``"none"`` (FP32), ``"builder-flag"``
    (TensorRT 10's ``BuilderFlag.FP16``) or ``"onnx-fp16"`` (the ONNX converted before a
    strongly typed build); ``note`` says why, for logs and ``fogline cloud doctor``."""

    method: Literal["none", "builder-flag", "onnx-fp16"]
    note: str

    @property
    def label(self) -> str:
        return "fp32" if self.method == "none" else "fp16"


def plan_precision(
    fp16: bool,
    *,
    trt_version: str,
    has_fp16_flag: bool,
    platform_fast_fp16: bool | None,
) -> Precision:
    """Decide how to honour ``fp16`` with the installed TensorRT's API.

    A major version of 11 or more is strongly typed whatever flags it still exposes; below
    that, a missing ``BuilderFlag.FP16`` means a build without FP16 support.
    ``platform_fast_fp16`` is the builder's ``platform_has_fast_fp16`` (None where the
    attribute no longer exists).
    """
    if not fp16:
        return Precision("none", "FP32 as configured")
    major = trt_major(trt_version)
    if (major is not None and major >= STRONGLY_TYPED_MAJOR) or (
        major is None and not has_fp16_flag
    ):
        return Precision(
            "onnx-fp16", f"TensorRT {trt_version} is strongly typed: the ONNX is converted to FP16"
        )
    if not has_fp16_flag:
        return Precision("none", f"TensorRT {trt_version} has no FP16 builder flag; FP32 engine")
    if platform_fast_fp16 is False:
        return Precision("none", "this GPU has no fast FP16; FP32 engine")
    return Precision("builder-flag", f"TensorRT {trt_version}: BuilderFlag.FP16")


def fp16_problem(model: Any) -> str | None:
    """Why an ``onnx.ModelProto`` should not be converted to FP16, or None when it can be.

    Explicit Q/DQ nodes already fix the model's precision (a blanket cast would contradict
    them); float weights beyond FP16's range would turn into infinities.
    """
    from onnx import TensorProto, numpy_helper

    graphs = [model.graph]
    ops: set[str] = set()
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
        for init in graph.initializer:
            if init.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
                continue
            values = np.abs(numpy_helper.to_array(init))
            if float(np.max(values[np.isfinite(values)], initial=0.0)) > _FP16_MAX:
                return f"weight {init.name!r} holds values beyond FP16's range (±{_FP16_MAX:g})"
    qdq = sorted(ops & _QDQ_OPS)
    if qdq:
        return f"the model carries explicit quantization ({', '.join(qdq)})"
    return None


def convert_onnx_to_fp16(model_bytes: bytes) -> bytes:
    """The model with its float tensors in FP16 and its inputs and outputs kept FP32.

    Uses onnxruntime's converter (``onnxruntime.transformers.float16``, which needs the
    ``onnx`` package from the ``tools`` extra); it keeps operators that are unsafe in FP16 in
    FP32. Raises :class:`BackendError` naming why the model cannot be converted.
    """
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:
        raise BackendError(
            f"converting the model to FP16 needs the onnx package (fogline[tools]): {exc}"
        ) from exc
    # protobuf (onnx's own dependency) ships no type stubs: its error root, looked up.
    protobuf_error: type[Exception] = importlib.import_module("google.protobuf.message").Error

    try:
        model = onnx.load_from_string(model_bytes)
    except (protobuf_error, ValueError) as exc:  # DecodeError for bytes that are not ONNX
        raise BackendError(f"the cloud model is not a readable ONNX file: {exc}") from exc
    problem = fp16_problem(model)
    if problem is not None:
        raise BackendError(f"FP16 conversion skipped: {problem}")
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
        # The converter appends the casts it adds for FP32 inputs after the nodes that read
        # them; a valid ONNX graph lists every node after its inputs' producers.
        OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
        return bytes(converted.SerializeToString())
    except (
        onnx.checker.ValidationError,
        protobuf_error,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
    ) as exc:
        # What onnx, protobuf and numpy raise for a graph the converter cannot handle.
        raise BackendError(f"FP16 conversion failed: {exc}") from exc


def profile_shapes(
    name: str, shape: Sequence[int], max_batch_size: int, opt_batch_size: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one network input for batches 1..``max_batch_size``.

    Only the batch axis may be dynamic (``-1``): the profile pins every other axis, so a
    model with dynamic spatial axes is refused here rather than failing at its first real
    request. A fixed batch axis is accepted only where it equals the only batch served (1).
    """
    dims = tuple(int(d) for d in shape)
    if not dims:
        return dims, dims, dims
    other = [i for i, d in enumerate(dims[1:], start=1) if d < 0]
    if other:
        raise BackendError(
            f"input {name!r} {list(dims)} has dynamic axes {other} besides the batch axis; "
            'the TensorRT backend profiles the batch axis only (use backend = "onnxruntime")'
        )
    if dims[0] >= 0:
        if dims[0] == 1 and max_batch_size == 1:
            return dims, dims, dims
        raise BackendError(
            f"input {name!r} has a fixed batch axis of {dims[0]}; batches of 1..{max_batch_size} "
            "need the cloud model exported with a dynamic batch axis"
        )
    return (
        (1, *dims[1:]),
        (opt_batch_size, *dims[1:]),
        (max_batch_size, *dims[1:]),
    )


@dataclass(frozen=True)
class LoadedEngine(Generic[E]):
    """An engine from :meth:`EngineCache.load_or_build`: ``meta`` is what its header says
    (``precision``, ``tensorrt``, ``gpu`` …) and ``from_cache`` whether the build was saved."""

    engine: E
    meta: dict[str, Any]
    path: Path
    from_cache: bool


@dataclass(frozen=True)
class EngineCache:
    """Serialized engines in ``directory``, one file per key, written atomically (0644).

    A file is used only when its header names the same key and its plan matches the
    recorded SHA-256; anything else (truncated, corrupted, renamed, from another format
    version, or refused by TensorRT) is rebuilt with a warning. A directory that cannot be
    written costs a rebuild at every start, not a failure.
    """

    directory: Path
    mode: int = 0o644

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.engine"

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | str:
        """The cached plan and its header, or the reason there is none usable."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return "not cached"
        except OSError as exc:
            return f"unreadable ({exc})"
        return _parse(blob, key)

    def write(self, key: str, plan: bytes, meta: Mapping[str, Any]) -> Path | None:
        """Store ``plan`` under ``key``; None (and a warning) when the disk refuses."""
        path = self.path(key)
        header = dict(meta) | {
            "format": _FORMAT,
            "key": key,
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "plan_bytes": len(plan),
        }
        head = json.dumps(header, sort_keys=True).encode()
        try:
            _write_atomically(path, _MAGIC + _HEADER_LEN.pack(len(head)) + head + plan, self.mode)
        except OSError as exc:
            log.warning(
                "cannot write the TensorRT engine cache %s (%s); the engine will be rebuilt at "
                "every start",
                path,
                exc,
            )
            return None
        return path

    def load_or_build(
        self,
        key: str,
        *,
        build: Callable[[], tuple[bytes, Mapping[str, Any]]],
        deserialize: Callable[[bytes], E | None],
    ) -> LoadedEngine[E]:
        """The engine for ``key``: deserialized from the cache when a valid file is there,
        else built (``build`` returns the plan and header fields), cached and deserialized."""
        path = self.path(key)
        cached = self.read(key)
        if isinstance(cached, tuple):
            plan, meta = cached
            engine = _deserialize(deserialize, plan)
            if engine is not None:
                return LoadedEngine(engine, meta, path, from_cache=True)
            log.warning("TensorRT refused the cached engine %s; rebuilding", path)
        elif cached != "not cached":
            log.warning("cached TensorRT engine %s is %s; rebuilding", path, cached)
        built, fields = build()
        engine = _deserialize(deserialize, built)
        if engine is None:
            raise BackendError("TensorRT could not load the engine it had just built")
        written = self.write(key, built, fields)
        return LoadedEngine(engine, dict(fields), written or path, from_cache=False)


def _deserialize(deserialize: Callable[[bytes], E | None], plan: bytes) -> E | None:
    try:
        return deserialize(plan)
    except (RuntimeError, TypeError, ValueError) as exc:
        log.warning("TensorRT could not deserialize an engine: %s", exc)
        return None


def _parse(blob: bytes, key: str) -> tuple[bytes, dict[str, Any]] | str:
    if not blob.startswith(_MAGIC):
        return "not a fogline engine file"
    start = len(_MAGIC) + _HEADER_LEN.size
    if len(blob) < start:
        return "truncated"
    (head_len,) = _HEADER_LEN.unpack_from(blob, len(_MAGIC))
    try:
        meta = json.loads(blob[start : start + head_len])
    except (ValueError, UnicodeDecodeError):
        return "corrupted (unreadable header)"
    if not isinstance(meta, dict):
        return "corrupted (unreadable header)"
    if meta.get("format") != _FORMAT:
        return f"of another format version ({meta.get('format')!r})"
    if meta.get("key") != key:
        return "built for something else (its key does not match)"
    plan = blob[start + head_len :]
    if len(plan) != meta.get("plan_bytes"):
        return "truncated"
    if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
        return "corrupted (checksum mismatch)"
    return plan, meta


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``: readers
    (other workers sharing the cache) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class _Slot:
    """One execution context and the CUDA stream its batches run on."""

    context: Any
    stream: Any


_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


class TensorRTBackend:
    """A TensorRT engine with a pool of execution contexts, one CUDA stream each.

    ``run`` may be called from several threads at once: each call takes a free context (or
    waits for one), so up to ``execution_contexts`` batches are on the GPU together. Every
    context holds its own activation memory, which is why the pool is small.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int,
        cache_dir: Path | None = None,
        fp16: bool = False,
        device_id: int = 0,
        execution_contexts: int = 2,
        opt_batch_size: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        opt = max_batch_size if opt_batch_size is None else opt_batch_size
        if not 1 <= opt <= max_batch_size:
            raise ValueError(f"opt_batch_size must lie in 1..{max_batch_size}, got {opt}")
        if execution_contexts < 1:
            raise ValueError(f"execution_contexts must be at least 1, got {execution_contexts}")
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA device and none is available")
        if not 0 <= device_id < torch.cuda.device_count():
            raise BackendError(
                f"CUDA device {device_id} does not exist ({torch.cuda.device_count()} visible)"
            )
        self._trt = trt
        self._torch = torch
        self._device = torch.device("cuda", device_id)
        self._max_batch_size = max_batch_size
        self._opt_batch_size = opt
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            model_bytes = Path(model_path).read_bytes()
        except OSError as exc:
            raise BackendError(f"cannot read the cloud model {model_path}: {exc}") from exc
        gpu = str(torch.cuda.get_device_name(device_id))
        key = engine_cache_key(
            model_bytes,
            trt.__version__,
            gpu,
            max_batch_size,
            fp16,
            opt_batch_size=opt,
            profiles=execution_contexts,
        )
        self._profiles = execution_contexts
        cache = EngineCache(cache_dir if cache_dir is not None else default_engine_cache_dir())

        def build() -> tuple[bytes, dict[str, Any]]:
            started = time.monotonic()
            plan, precision = self._build(model_bytes, fp16)
            log.info(
                "TensorRT engine for %s built in %.1f s (%s: %s)",
                model_path,
                time.monotonic() - started,
                precision.label,
                precision.note,
            )
            return plan, {
                "model": str(model_path),
                "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
                "tensorrt": trt.__version__,
                "gpu": gpu,
                "batch": [1, opt, max_batch_size],
                "profiles": execution_contexts,
                "precision": precision.label,
                "precision_note": precision.note,
                "built_unix": int(time.time()),
            }

        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)  # must outlive the engine
            loaded = cache.load_or_build(
                key, build=build, deserialize=self._runtime.deserialize_cuda_engine
            )
            self._engine = loaded.engine
            if self._engine.num_optimization_profiles < execution_contexts:
                raise BackendError(
                    f"the engine holds {self._engine.num_optimization_profiles} optimization "
                    f"profiles, fewer than the {execution_contexts} execution contexts asked for"
                )
            self._slots = [self._new_slot(i) for i in range(execution_contexts)]
        self.engine_path: Path = loaded.path
        self.engine_from_cache: bool = loaded.from_cache
        self.precision: str = str(loaded.meta.get("precision", "unknown"))
        self.max_concurrent_batches: int = execution_contexts
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = tuple(n for n in names if is_input[n])
        self.output_names: tuple[str, ...] = tuple(n for n in names if not is_input[n])
        self._dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._input_shapes = {n: tuple(engine.get_tensor_shape(n)) for n in self._inputs}
        log.info(
            "TensorRT engine %s (%s, %s) on %s with %d execution contexts",
            self.engine_path,
            "cached" if self.engine_from_cache else "built now",
            self.precision,
            gpu,
            execution_contexts,
        )

    @property
    def name(self) -> str:
        return "tensorrt"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    def _new_slot(self, profile: int) -> _Slot:
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendError("TensorRT could not create an execution context (GPU memory?)")
        stream = self._torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        if not context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise BackendError(f"TensorRT refused optimization profile {profile}")
        stream.synchronize()
        return _Slot(context, stream)

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
        if name not in _TORCH_DTYPES:
            raise BackendError(f"TensorRT tensor type {name} has no torch equivalent here")
        return getattr(self._torch, _TORCH_DTYPES[name])

    def _build(self, model_bytes: bytes, fp16: bool) -> tuple[bytes, Precision]:
        trt = self._trt
        builder = trt.Builder(self._logger)
        precision = plan_precision(
            fp16,
            trt_version=trt.__version__,
            has_fp16_flag=hasattr(trt.BuilderFlag, "FP16"),
            platform_fast_fp16=getattr(builder, "platform_has_fast_fp16", None),
        )
        onnx_bytes = model_bytes
        if precision.method == "onnx-fp16":
            try:
                onnx_bytes = convert_onnx_to_fp16(model_bytes)
            except BackendError as exc:
                log.warning("building an FP32 engine instead of FP16: %s", exc)
                precision = Precision("none", str(exc))
        # Explicit batch is the only mode since TensorRT 10, and TensorRT 11 networks are
        # always strongly typed, so no creation flags are needed on either.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse the cloud model: {errors}")
        config = builder.create_builder_config()
        if precision.method == "builder-flag":
            config.set_flag(trt.BuilderFlag.FP16)
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes[tensor.name] = profile_shapes(
                tensor.name, tuple(tensor.shape), self._max_batch_size, self._opt_batch_size
            )
        for _ in range(self._profiles):  # one per execution context, all alike
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in shapes.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError("TensorRT failed to build an engine for the cloud model")
        return bytes(plan), precision

    def _batch(self, inputs: Mapping[str, np.ndarray]) -> int:
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise BackendError(f"missing input(s) {', '.join(missing)}")
        sizes = {n: np.shape(inputs[n])[0] if np.ndim(inputs[n]) else 0 for n in self._inputs}
        distinct = set(sizes.values())
        if len(distinct) != 1:
            raise BackendError(f"inputs disagree on the batch size: {sizes}")
        batch = int(distinct.pop())
        if not 1 <= batch <= self._max_batch_size:
            raise BackendError(
                f"batch of {batch} is outside the engine's range 1..{self._max_batch_size}"
            )
        return batch

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._batch(inputs)
        slot = self._free.get()
        try:
            return self._run_on(slot, inputs)
        finally:
            self._free.put(slot)

    def _run_on(self, slot: _Slot, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        context = slot.context
        keep: list[Any] = []  # device buffers must outlive the asynchronous execution
        with torch.cuda.device(self._device), torch.cuda.stream(slot.stream):
            for name in self._inputs:
                host = np.require(inputs[name], requirements=("C_CONTIGUOUS", "WRITEABLE"))
                try:
                    staged = torch.from_numpy(host)
                except TypeError as exc:
                    raise BackendError(f"input {name!r}: {exc}") from exc
                dev = staged.to(self._device, non_blocking=True).to(self._dtypes[name])
                keep.append(dev)
                if not context.set_input_shape(name, tuple(dev.shape)):
                    raise BackendError(
                        f"input {name!r} shape {tuple(dev.shape)} does not fit the engine "
                        f"(built for {self._input_shapes[name]})"
                    )
                context.set_tensor_address(name, dev.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"output {name!r} has a data-dependent shape {shape}")
                out = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
                outputs[name] = out
                context.set_tensor_address(name, out.data_ptr())
            if not context.execute_async_v3(slot.stream.cuda_stream):
                raise BackendError("TensorRT execution failed")
            # Copies queued on this stream after the execution; .cpu() waits for them.
            host_out = {
                n: (t.float() if t.dtype == torch.bfloat16 else t).cpu() for n, t in outputs.items()
            }
            slot.stream.synchronize()
        return {n: t.numpy() for n, t in host_out.items()}

    def warmup(self) -> None:
        """Run the smallest and the largest batch on every context, so no first request pays
        for lazy allocation."""
        for slot in self._slots:
            for batch in sorted({1, self._max_batch_size}):
                feed = {
                    name: np.zeros(dummy_shape(self._input_shapes[name], batch), np.float32)
                    for name in self._inputs
                }  # _run_on casts to each input's type on the GPU
                self._run_on(slot, feed)
