"""Native TensorRT backend (TensorRT 10 and 11 Python API), torch CUDA tensors as buffers.

The engine is built from the bundle's ONNX cloud part with one optimization profile over
the batch range 1..max_batch_size, and cached on disk under a key made of the model's
SHA-256, the TensorRT version, the GPU name and the batch range, because an engine is only
valid for the exact library and device that built it.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``/``INT8``): a
network is always strongly typed and precision comes from the ONNX itself (explicit casts
and Q/DQ nodes). On TensorRT 10, ``fp16=True`` still lets the builder pick FP16 kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fogline.cloud_service._backends import dummy_shape
from fogline.cloud_service._config import default_engine_cache_dir
from fogline.cloud_service.errors import BackendError

__all__ = ["TensorRTBackend", "engine_cache_key"]

log = logging.getLogger("fogline.cloud.tensorrt")


def engine_cache_key(
    model_bytes: bytes, trt_version: str, gpu_name: str, max_batch_size: int, fp16: bool
) -> str:
    """Everything an engine depends on, hashed into a file name."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(model_bytes).digest())
    for part in (trt_version, gpu_name, f"batch=1..{max_batch_size}", f"fp16={fp16}"):
        digest.update(b"\x00" + part.encode())
    return digest.hexdigest()


class TensorRTBackend:
    """A TensorRT engine with one execution context and one CUDA stream."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int,
        cache_dir: Path | None = None,
        fp16: bool = False,
    ) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA device and none is available")
        self._trt = trt
        self._torch = torch
        self._device = torch.device("cuda")
        self._max_batch_size = max_batch_size
        self._logger = trt.Logger(trt.Logger.WARNING)
        model_bytes = Path(model_path).read_bytes()
        key = engine_cache_key(
            model_bytes, trt.__version__, torch.cuda.get_device_name(), max_batch_size, fp16
        )
        cache_file = (cache_dir or default_engine_cache_dir()) / f"{key}.engine"
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        engine = None
        if cache_file.is_file():
            engine = self._runtime.deserialize_cuda_engine(cache_file.read_bytes())
            if engine is None:
                log.warning("cached TensorRT engine %s is unusable; rebuilding", cache_file)
        if engine is None:
            plan = self._build(model_bytes, fp16)
            _write_atomically(cache_file, plan)
            log.info("TensorRT engine for %s built and cached at %s", model_path, cache_file)
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"TensorRT could not load the engine it built for {model_path}")
        self._engine = engine
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = tuple(n for n in names if is_input[n])
        self.output_names: tuple[str, ...] = tuple(n for n in names if not is_input[n])
        self._np_dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._torch_dtypes = {
            n: torch.from_numpy(np.empty(0, dt)).dtype for n, dt in self._np_dtypes.items()
        }

    @property
    def name(self) -> str:
        return "tensorrt"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    def _build(self, model_bytes: bytes, fp16: bool) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch; strongly typed on TensorRT 11
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse the cloud model: {errors}")
        config = builder.create_builder_config()
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10; gone in 11
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            opt = max(1, self._max_batch_size // 2)
            profile.set_shape(
                tensor.name,
                dummy_shape(shape, 1),
                dummy_shape(shape, opt),
                dummy_shape(shape, self._max_batch_size),
            )
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError("TensorRT failed to build an engine for the cloud model")
        return bytes(plan)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        keep: list[Any] = []  # buffers must outlive the asynchronous execution
        with torch.cuda.stream(self._stream):
            for name in self._inputs:
                host = np.ascontiguousarray(inputs[name], dtype=self._np_dtypes[name])
                dev = torch.from_numpy(host).to(self._device, non_blocking=True)
                keep.append(dev)
                if not self._context.set_input_shape(name, tuple(dev.shape)):
                    raise BackendError(
                        f"input {name!r} shape {tuple(dev.shape)} is outside the profile"
                    )
                self._context.set_tensor_address(name, dev.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._torch_dtypes[name], device=self._device)
                outputs[name] = out
                self._context.set_tensor_address(name, out.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise BackendError("TensorRT execution failed")
            host_out = {n: t.to("cpu", non_blocking=False) for n, t in outputs.items()}
        self._stream.synchronize()
        return {n: t.numpy() for n, t in host_out.items()}

    def warmup(self) -> None:
        for batch in sorted({1, self._max_batch_size}):
            feed = {}
            for name in self._inputs:
                shape = self._engine.get_tensor_shape(name)
                feed[name] = np.zeros(dummy_shape(tuple(shape), batch), self._np_dtypes[name])
            self.run(feed)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".engine-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
