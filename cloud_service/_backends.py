"""Inference backends for a bundle's cloud part, behind one small interface.

Three implementations: onnxruntime (CPU, or its TensorRT / CUDA execution providers when
the installed build has them and a CUDA device is visible), native TensorRT
(:mod:`._tensorrt`) and torch (:mod:`._torch_backend`: the ONNX graph converted to a torch
module, CUDA graphs on a GPU). :func:`select_backend` picks one and records why, so a worker can say
which it runs and why not the other; ``fogline cloud doctor`` shows the same reasoning.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort

from fogline.cloud_service.errors import BackendError
from fogline.compression import onnxruntime_errors

__all__ = [
    "Availability",
    "Backend",
    "BackendChoice",
    "BackendSettings",
    "OnnxRuntimeBackend",
    "choose_providers",
    "cuda_device_name",
    "load_backend",
    "ort_provider_options",
    "select_backend",
]

log = logging.getLogger("fogline.cloud.backends")

# Best first. onnxruntime falls back along the list for operators a provider lacks.
_PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

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
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}

# Wheels that ship TensorRT's Python bindings; the first one installed names the version.
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")


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


def choose_providers(available: Sequence[str], *, gpu: bool = True) -> list[str]:
    """The execution providers to ask onnxruntime for, best first; CPU always last.

    ``gpu=False`` (no CUDA device visible) leaves out the TensorRT and CUDA providers even
    when the build has them: onnxruntime would only fail to start them and fall back.
    """
    chosen = [p for p in _PREFERRED_PROVIDERS if p in available and (gpu or p not in GPU_PROVIDERS)]
    return chosen if "CPUExecutionProvider" in chosen else [*chosen, "CPUExecutionProvider"]


def dummy_shape(shape: Sequence[Any], batch: int) -> tuple[int, ...]:
    """A concrete shape for warm-up: the batch axis set to ``batch``, other symbolic axes 1."""
    return tuple(
        batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(shape)
    )


def _profile_dims(shape: Sequence[Any], batch: int) -> str | None:
    """``16x8`` style dims with the batch axis set, or None when another axis is symbolic."""
    dims = [batch]
    for d in shape[1:]:
        if not isinstance(d, int) or d <= 0:
            return None
        dims.append(d)
    return "x".join(str(d) for d in dims)


def _profile_shapes(
    inputs: Mapping[str, Sequence[Any]], max_batch_size: int, opt_batch_size: int
) -> dict[str, str] | None:
    """onnxruntime's ``trt_profile_{min,opt,max}_shapes`` for the batch range, or None when
    the model has nothing to profile or an axis other than the batch axis is symbolic (then
    the TensorRT provider derives profiles from the shapes it meets at run time)."""
    parts: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for name, shape in inputs.items():
        if not shape or (isinstance(shape[0], int) and shape[0] > 0):
            continue  # no batch axis, or a fixed one: nothing to choose
        if any(c in name for c in ":,"):
            return None  # the option's syntax cannot name this input
        for which, batch in (("min", 1), ("opt", opt_batch_size), ("max", max_batch_size)):
            dims = _profile_dims(shape, batch)
            if dims is None:
                return None
            parts[which].append(f"{name}:{dims}")
    if not parts["min"]:
        return None
    return {f"trt_profile_{which}_shapes": ",".join(v) for which, v in parts.items()}


def ort_provider_options(
    providers: Sequence[str],
    *,
    inputs: Mapping[str, Sequence[Any]],
    max_batch_size: int,
    opt_batch_size: int | None = None,
    engine_cache_dir: Path | None = None,
    fp16: bool = False,
    device_id: int = 0,
) -> list[dict[str, str]]:
    """Options for each provider in ``providers`` (same order), as onnxruntime takes them.

    TensorRT: engine and timing caches in ``engine_cache_dir`` (none when it is None), FP16
    when asked, an optimization profile over batch 1..``max_batch_size`` for every input with
    a symbolic batch axis (``inputs`` maps input names to onnxruntime shapes), the device.
    CUDA: the device. CPU and others: nothing.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    opt = max_batch_size if opt_batch_size is None else opt_batch_size
    if not 1 <= opt <= max_batch_size:
        raise ValueError(f"opt_batch_size must lie in 1..{max_batch_size}, got {opt}")
    if device_id < 0:
        raise ValueError(f"device_id must be 0 or more, got {device_id}")
    options: list[dict[str, str]] = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            trt: dict[str, str] = {
                "device_id": str(device_id),
                "trt_fp16_enable": "True" if fp16 else "False",
            }
            if engine_cache_dir is not None:
                trt |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(engine_cache_dir),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(engine_cache_dir),
                }
            trt |= _profile_shapes(inputs, max_batch_size, opt) or {}
            options.append(trt)
        elif provider == "CUDAExecutionProvider":
            options.append({"device_id": str(device_id)})
        else:
            options.append({})
    return options


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def tensorrt_distribution_version() -> str | None:
    """The installed TensorRT wheel's version, read from its metadata (no CUDA import)."""
    for dist in _TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _ort_cache_dir(engine_cache_dir: Path) -> Path:
    # onnxruntime's TensorRT provider does not invalidate its engine cache when onnxruntime
    # or TensorRT change, so each pair gets its own folder; its file names already carry a
    # hash of the model and the GPU's compute capability.
    trt = tensorrt_distribution_version() or "unknown"
    return engine_cache_dir / "onnxruntime" / _slug(f"ort-{ort.__version__}-trt-{trt}")


class OnnxRuntimeBackend:
    """An onnxruntime session over the cloud model.

    ``providers`` defaults to the best the installed onnxruntime offers (TensorRT, CUDA,
    CPU). When the TensorRT provider is among them, ``engine_cache_dir`` (engine and timing
    caches), ``fp16`` and an optimization profile over batch 1..``max_batch_size`` are
    passed to it; ``device_id`` picks the GPU for both GPU providers.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int = 1,
        max_batch_size: int = 32,
        providers: Sequence[str] | None = None,
        engine_cache_dir: Path | None = None,
        fp16: bool = False,
        device_id: int = 0,
        opt_batch_size: int | None = None,
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
        provider_options: list[dict[str, str]] | None = None
        if any(p in GPU_PROVIDERS for p in chosen):
            inputs = _input_shapes(model_path) if "TensorrtExecutionProvider" in chosen else {}
            cache = None if engine_cache_dir is None else _ort_cache_dir(engine_cache_dir)
            if cache is not None and "TensorrtExecutionProvider" in chosen:
                _make_cache_dir(cache)
            provider_options = ort_provider_options(
                chosen,
                inputs=inputs,
                max_batch_size=max_batch_size,
                opt_batch_size=opt_batch_size,
                engine_cache_dir=cache,
                fp16=fp16,
                device_id=device_id,
            )
        with onnxruntime_errors(into=BackendError, what=f"onnxruntime cannot load {model_path}"):
            self._session = ort.InferenceSession(
                str(model_path), opts, providers=chosen, provider_options=provider_options
            )
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        missing = [p for p in chosen if p in GPU_PROVIDERS and p not in self.providers]
        if missing:
            log.warning(
                "onnxruntime could not start %s for %s; running on %s",
                ", ".join(missing),
                model_path,
                ", ".join(self.providers),
            )
        inputs_meta = self._session.get_inputs()
        self._input_names = tuple(i.name for i in inputs_meta)
        self._input_shapes = {i.name: tuple(i.shape) for i in inputs_meta}
        self._input_dtypes = {
            i.name: _ORT_TYPES.get(i.type, np.dtype(np.float32)) for i in inputs_meta
        }
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
        with onnxruntime_errors(into=BackendError, what="onnxruntime run failed"):
            outs = self._session.run(None, feed)
        return dict(zip(self.output_names, outs, strict=True))

    def warmup(self) -> None:
        """Run the smallest and the largest batch once, so the first real batch is fast (and,
        with the TensorRT provider, so its engine is built before the model reports ready)."""
        for batch in sorted({1, self._max_batch_size}):
            self.run(
                {
                    n: _dummy(dummy_shape(self._input_shapes[n], batch), self._input_dtypes[n])
                    for n in self._input_names
                }
            )


def _dummy(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Warm-up input: zeros, or empty strings for a string tensor."""
    if dtype == np.dtype(object):
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype)


def _input_shapes(model_path: str | Path) -> dict[str, tuple[Any, ...]]:
    """The model's input shapes, read by a throwaway CPU session (the TensorRT provider's
    profile options must name them before the real session exists)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with onnxruntime_errors(into=BackendError, what=f"onnxruntime cannot load {model_path}"):
        probe = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return {i.name: tuple(i.shape) for i in probe.get_inputs()}


def _make_cache_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning(
            "engine cache %s cannot be created (%s); engines are rebuilt each start", path, exc
        )


@dataclass(frozen=True)
class Availability:
    """What this host offers the backends. :meth:`detect` looks; tests build one by hand.

    ``tensorrt_problem`` says why native TensorRT cannot run (None when it can), and
    ``torch_cuda_problem`` why torch cannot run the model on a CUDA device;
    ``providers`` are onnxruntime's available execution providers; ``cuda_device`` names the
    visible CUDA device (None when there is none).
    """

    tensorrt_problem: str | None
    providers: tuple[str, ...]
    cuda_device: str | None
    #: Why the torch backend cannot run on a CUDA device here (None when it can).
    torch_cuda_problem: str | None = "not checked"

    @classmethod
    def detect(
        cls, device_id: int = 0, *, tensorrt: bool = True, torch: bool = True
    ) -> Availability:
        """Look at this host; ``tensorrt=False`` skips importing TensorRT and ``torch=False``
        the torch CUDA probe (each then says "not checked").

        The CUDA device is looked for only when something could use it (TensorRT or a GPU
        execution provider): the probe may import torch, which costs seconds."""
        problem = _tensorrt_unavailable(device_id) if tensorrt else "not checked"
        torch_problem = _torch_cuda_unavailable(device_id) if torch else "not checked"
        providers = tuple(ort.get_available_providers())
        usable = (
            problem is None or torch_problem is None or any(p in GPU_PROVIDERS for p in providers)
        )
        return cls(
            tensorrt_problem=problem,
            providers=providers,
            cuda_device=cuda_device_name(device_id) if usable else None,
            torch_cuda_problem=torch_problem,
        )


@dataclass(frozen=True)
class BackendChoice:
    """Which backend to use and why (``reason`` is shown in logs and ``/readyz``).

    For onnxruntime, ``providers`` are the execution providers to ask for (empty: whatever
    the installed build offers). For torch, ``device`` is ``cuda`` or ``cpu`` (None: CUDA
    when torch sees a device).
    """

    kind: Literal["onnxruntime", "tensorrt", "torch"]
    reason: str
    providers: tuple[str, ...] = ()
    device: Literal["cuda", "cpu"] | None = None

    def load(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int = 32,
        threads: int = 1,
        engine_cache_dir: Path | None = None,
        fp16: bool = False,
        device_id: int = 0,
        execution_contexts: int = 2,
        opt_batch_size: int | None = None,
    ) -> Backend:
        """Load ``model_path`` into this backend (TensorRT builds or reuses a cached engine;
        onnxruntime's TensorRT provider does the same in its own cache folder)."""
        if self.kind == "tensorrt":
            from fogline.cloud_service._tensorrt import TensorRTBackend

            return TensorRTBackend(
                model_path,
                max_batch_size=max_batch_size,
                cache_dir=engine_cache_dir,
                fp16=fp16,
                device_id=device_id,
                execution_contexts=execution_contexts,
                opt_batch_size=opt_batch_size,
            )
        if self.kind == "torch":
            from fogline.cloud_service._torch_backend import TorchBackend

            return TorchBackend(
                model_path,
                max_batch_size=max_batch_size,
                device=self.device,
                device_id=device_id,
                threads=threads,
            )
        return OnnxRuntimeBackend(
            model_path,
            threads=threads,
            max_batch_size=max_batch_size,
            providers=self.providers or None,
            engine_cache_dir=engine_cache_dir,
            fp16=fp16,
            device_id=device_id,
            opt_batch_size=opt_batch_size,
        )


@dataclass(frozen=True)
class BackendSettings:
    """Every setting a backend takes besides the model and its batch bound, so that one
    value carries them to :func:`load_backend` whichever way the model was loaded (a
    bundle's cloud part or a model-repository folder).

    ``threads`` is onnxruntime's intra-op thread count (0: its default); the rest are the
    ``[tensorrt]`` settings (engine cache, FP16, device, execution contexts, the batch size
    the optimization profile is tuned for), which onnxruntime's GPU providers also use.
    """

    threads: int = 1
    engine_cache_dir: Path | None = None
    fp16: bool = False
    device_id: int = 0
    execution_contexts: int = 2
    opt_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (backend default) or more, got {self.threads}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be 0 or more, got {self.device_id}")
        if self.execution_contexts < 1:
            raise ValueError(
                f"execution_contexts must be at least 1, got {self.execution_contexts}"
            )
        if self.opt_batch_size is not None and self.opt_batch_size < 1:
            raise ValueError(f"opt_batch_size must be at least 1, got {self.opt_batch_size}")


def load_backend(
    choice: BackendChoice,
    model_path: str | Path,
    *,
    max_batch_size: int,
    settings: BackendSettings,
) -> Backend:
    """The one place a model is loaded into a backend: ``choice`` with every setting.

    ``opt_batch_size`` is clamped to ``max_batch_size`` (a model that batches less than the
    configured optimum is tuned for its largest batch)."""
    opt = settings.opt_batch_size
    if opt is not None:
        opt = min(opt, max_batch_size)
    return choice.load(
        model_path,
        max_batch_size=max_batch_size,
        threads=settings.threads,
        engine_cache_dir=settings.engine_cache_dir,
        fp16=settings.fp16,
        device_id=settings.device_id,
        execution_contexts=settings.execution_contexts,
        opt_batch_size=opt,
    )


def cuda_device_name(device_id: int = 0) -> str | None:
    """The name of CUDA device ``device_id``, or None when none is visible.

    Asks torch when it imports with CUDA, otherwise ``nvidia-smi`` (present wherever the
    NVIDIA driver is), so a host with onnxruntime-gpu but a CPU build of torch is still seen.
    """
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available() and device_id < torch.cuda.device_count():
                return str(torch.cuda.get_device_name(device_id))
        except (ImportError, OSError, RuntimeError):
            pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[device_id] if device_id < len(names) else None


def _tensorrt_unavailable(device_id: int = 0) -> str | None:
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
        return f"torch {torch.__version__} sees no CUDA device"
    if device_id >= torch.cuda.device_count():
        return f"CUDA device {device_id} does not exist ({torch.cuda.device_count()} visible)"
    return None


def _torch_cuda_unavailable(device_id: int = 0) -> str | None:
    """Why the torch backend cannot run on CUDA device ``device_id`` here, or None.

    Importing torch costs seconds, so a host without an NVIDIA driver is told apart first
    by its files; a CPU-only host never pays for the import."""
    for module in ("torch", "onnx"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} package is not installed"
    if not (
        shutil.which("nvidia-smi")
        or Path("/proc/driver/nvidia").exists()
        or Path("/dev/nvidia0").exists()
    ):
        return "no NVIDIA driver on this host"
    try:
        import torch
    except (ImportError, OSError, RuntimeError) as exc:
        return f"torch does not import: {exc}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if device_id >= torch.cuda.device_count():
        return f"CUDA device {device_id} does not exist ({torch.cuda.device_count()} visible)"
    return None


def select_backend(
    requested: str = "auto", *, availability: Availability | None = None
) -> BackendChoice:
    """Pick a backend: ``"auto"`` takes native TensorRT when it imports and CUDA is present,
    then torch when it sees a CUDA device, otherwise onnxruntime with the best providers
    this host can start, and records the reason either way.

    Asking for ``"tensorrt"`` where it cannot run raises :class:`BackendError`; asking for
    ``"torch"`` without a CUDA device runs the same converted module on the CPU, eagerly.
    ``availability`` defaults to :meth:`Availability.detect`.
    """
    if requested not in ("auto", "onnxruntime", "tensorrt", "torch"):
        raise ValueError(f"backend {requested!r} must be auto, onnxruntime, tensorrt or torch")
    if requested == "torch" and availability is None:
        # Even the CPU fallback needs both; a hand-built availability describes its host.
        for module in ("torch", "onnx"):
            if importlib.util.find_spec(module) is None:
                raise BackendError(f"torch backend requested but the {module} package is missing")
    host = availability or Availability.detect(
        tensorrt=requested in ("auto", "tensorrt"), torch=requested in ("auto", "torch")
    )
    if requested == "torch":
        if host.torch_cuda_problem is None:
            return BackendChoice(
                "torch", f"requested; CUDA device {host.cuda_device or '0'}", device="cuda"
            )
        return BackendChoice(
            "torch", f"requested; on the CPU ({host.torch_cuda_problem})", device="cpu"
        )
    providers = tuple(choose_providers(host.providers, gpu=host.cuda_device is not None))
    if requested == "onnxruntime":
        return BackendChoice(
            "onnxruntime",
            f"requested in the configuration; providers {', '.join(providers)}",
            providers,
        )
    why_not = host.tensorrt_problem
    if requested == "tensorrt":
        if why_not is not None:
            raise BackendError(f"TensorRT backend requested but unavailable: {why_not}")
        return BackendChoice("tensorrt", "requested in the configuration")
    if why_not is None:
        return BackendChoice(
            "tensorrt", f"tensorrt imports and CUDA device {host.cuda_device or '0'} is available"
        )
    if host.torch_cuda_problem is None:
        return BackendChoice(
            "torch",
            f"native TensorRT unavailable ({why_not}); torch sees CUDA device "
            f"{host.cuda_device or '0'}",
            device="cuda",
        )
    unused = [p for p in GPU_PROVIDERS if p in host.providers and p not in providers]
    note = f" ({', '.join(unused)} left out: no CUDA device visible)" if unused else ""
    return BackendChoice(
        "onnxruntime",
        f"native TensorRT unavailable ({why_not}); providers {', '.join(providers)}{note}",
        providers,
    )
