"""``fogline cloud doctor``: which inference backends and providers this host can use, and
why not the others.

:func:`diagnose` gathers the facts (:meth:`HostFacts.gather`: imports, versions, devices,
the engine cache directory) and turns them into :class:`Finding` rows
(:func:`findings_from`, pure, so every branch is testable without a GPU).
The ``fogline cloud doctor`` command prints them as a table or JSON. Heavy libraries
(onnxruntime, tensorrt, torch) are imported only when a diagnosis runs, never when the CLI
loads.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Finding", "HostFacts", "diagnose", "findings_from", "gpu_usable"]

_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
_GPU_EXTRA = "pip install 'fogline[gpu]'"


@dataclass(frozen=True)
class Finding:
    """One row of the diagnosis: what was checked, whether it is usable, and the detail
    (versions when it is, the reason when it is not). ``gpu_path`` marks the rows that are
    ways of running a model on a GPU."""

    check: str
    usable: bool
    detail: str
    gpu_path: bool = False


@dataclass(frozen=True)
class HostFacts:
    """What :func:`findings_from` judges. Gathered by :meth:`gather`; built by hand in tests.

    ``tensorrt_problem`` is why native TensorRT cannot run (None when it can), in the words
    :func:`~fogline.cloud_service._backends.select_backend` uses.
    """

    tensorrt_version: str | None
    tensorrt_problem: str | None
    tensorrt_has_fp16_flag: bool | None
    torch_version: str | None
    cuda_device: str | None
    nvidia_smi: str | None
    ort_version: str
    ort_providers: tuple[str, ...]
    ort_distributions: dict[str, str]
    fp16_converter_problem: str | None
    engine_cache_dir: Path
    engine_cache_problem: str | None
    requested_backend: str
    backend_kind: str | None
    backend_reason: str
    #: Why the torch backend cannot run on a CUDA device (None when it can).
    torch_cuda_problem: str | None = "not checked"

    @classmethod
    def gather(
        cls,
        *,
        engine_cache_dir: Path | None = None,
        backend: str = "auto",
        device_id: int = 0,
    ) -> HostFacts:
        """Look at this host (imports tensorrt and torch when installed; runs nothing on
        the GPU and creates no files)."""
        import onnxruntime as ort

        from fogline.cloud_service._backends import Availability, select_backend
        from fogline.cloud_service._config import default_engine_cache_dir
        from fogline.cloud_service.errors import BackendError

        host = Availability.detect(device_id)
        trt_version: str | None = None
        has_flag: bool | None = None
        if importlib.util.find_spec("tensorrt") is not None:
            try:
                import tensorrt as trt

                trt_version = str(trt.__version__)
                has_flag = hasattr(trt.BuilderFlag, "FP16")
            except (ImportError, OSError, RuntimeError, AttributeError):
                pass  # host.tensorrt_problem already says why
        torch_version: str | None = None
        if importlib.util.find_spec("torch") is not None:
            try:
                import torch

                torch_version = str(torch.__version__)
            except (ImportError, OSError, RuntimeError):
                pass
        cache_dir = engine_cache_dir if engine_cache_dir is not None else default_engine_cache_dir()
        try:
            choice = select_backend(backend, availability=host)
            kind: str | None = choice.kind
            reason = choice.reason
        except (BackendError, ValueError) as exc:
            kind, reason = None, str(exc)
        return cls(
            tensorrt_version=trt_version,
            tensorrt_problem=host.tensorrt_problem,
            tensorrt_has_fp16_flag=has_flag,
            torch_version=torch_version,
            cuda_device=host.cuda_device,
            nvidia_smi=shutil.which("nvidia-smi"),
            ort_version=str(ort.__version__),
            ort_providers=host.providers,
            ort_distributions=_installed(_ORT_DISTRIBUTIONS),
            fp16_converter_problem=_fp16_converter_problem(),
            engine_cache_dir=cache_dir,
            engine_cache_problem=_cache_dir_problem(cache_dir),
            requested_backend=backend,
            backend_kind=kind,
            backend_reason=reason,
            torch_cuda_problem=host.torch_cuda_problem,
        )


def _installed(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _fp16_converter_problem() -> str | None:
    if importlib.util.find_spec("onnx") is None:
        return "the onnx package is not installed (pip install 'fogline[tools]')"
    try:
        spec = importlib.util.find_spec("onnxruntime.transformers.float16")
    except ImportError:
        spec = None
    if spec is None:
        return "onnxruntime.transformers.float16 is missing from this onnxruntime"
    return None


def _cache_dir_problem(path: Path) -> str | None:
    """Why engines cannot be written under ``path``, or None; creates nothing."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing parent of {path}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def _cuda_detail(facts: HostFacts) -> str:
    if facts.cuda_device is not None:
        return facts.cuda_device
    why = []
    if facts.torch_version is None:
        why.append("torch is not installed")
    else:
        why.append(f"torch {facts.torch_version} sees none")
    why.append(
        "nvidia-smi lists none" if facts.nvidia_smi else "nvidia-smi not found (no NVIDIA driver)"
    )
    return "none visible: " + "; ".join(why)


def _tensorrt_fp16(facts: HostFacts) -> Finding:
    from fogline.cloud_service._tensorrt import plan_precision

    check = "tensorrt fp16"
    if facts.tensorrt_version is None:
        return Finding(check, False, "needs tensorrt")
    plan = plan_precision(
        True,
        trt_version=facts.tensorrt_version,
        has_fp16_flag=bool(facts.tensorrt_has_fp16_flag),
        platform_fast_fp16=None,
    )
    if plan.method == "onnx-fp16" and facts.fp16_converter_problem is not None:
        return Finding(check, False, f"{plan.note}, but {facts.fp16_converter_problem}")
    if plan.method == "builder-flag":
        return Finding(check, True, f"{plan.note} (used where the GPU has fast FP16)")
    return Finding(check, plan.method != "none", plan.note)


def _provider(facts: HostFacts, provider: str) -> Finding:
    check = f"onnxruntime {provider}"
    gpu = provider != "CPUExecutionProvider"
    if provider not in facts.ort_providers:
        if "onnxruntime-gpu" in facts.ort_distributions:
            why = "not offered by the installed onnxruntime-gpu (its CUDA libraries are missing?)"
        else:
            why = f"not in this onnxruntime build: install onnxruntime-gpu ({_GPU_EXTRA})"
        return Finding(check, False, why, gpu)
    if gpu and facts.cuda_device is None:
        return Finding(check, False, "in this build, but no CUDA device is visible", gpu)
    if provider == "TensorrtExecutionProvider":
        where = f"on {facts.cuda_device}; engines cached under {facts.engine_cache_dir}"
        return Finding(check, True, f"{where} (needs the TensorRT libraries at start)", gpu)
    return Finding(check, True, f"on {facts.cuda_device}" if gpu else "always available", gpu)


def findings_from(facts: HostFacts) -> list[Finding]:
    """The diagnosis as rows, in the order a reader checks them."""
    rows = [Finding("cuda device", facts.cuda_device is not None, _cuda_detail(facts))]
    if facts.tensorrt_problem is None:
        detail = f"TensorRT {facts.tensorrt_version} on {facts.cuda_device}"
    else:
        hint = f" ({_GPU_EXTRA})" if facts.tensorrt_version is None else ""
        detail = facts.tensorrt_problem + hint
    rows.append(Finding("tensorrt (native)", facts.tensorrt_problem is None, detail, True))
    rows.append(_tensorrt_fp16(facts))
    torch_ok = facts.torch_cuda_problem is None
    torch_detail = (
        f"torch {facts.torch_version} on {facts.cuda_device}, CUDA graphs per batch size"
        if torch_ok
        else str(facts.torch_cuda_problem)
    )
    rows.append(Finding("torch (CUDA graphs)", torch_ok, torch_detail, True))
    dists = facts.ort_distributions
    if len(dists) > 1:
        rows.append(
            Finding(
                "onnxruntime",
                True,
                f"{facts.ort_version}, but {' and '.join(sorted(dists))} are both installed: "
                "they share one module and the last installed wins; uninstall both, then "
                "install one",
            )
        )
    else:
        build = "GPU build" if "onnxruntime-gpu" in dists else "CPU build"
        rows.append(Finding("onnxruntime", True, f"{facts.ort_version} ({build})"))
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"):
        rows.append(_provider(facts, provider))
    cache = facts.engine_cache_dir
    if facts.engine_cache_problem is None:
        state = "writable" if cache.is_dir() else "will be created"
        rows.append(Finding("engine cache", True, f"{cache} ({state})"))
    else:
        rows.append(
            Finding(
                "engine cache",
                False,
                f"{cache}: {facts.engine_cache_problem}; engines would be rebuilt at every start",
            )
        )
    picked = facts.backend_kind is not None
    detail = f"{facts.backend_kind}: {facts.backend_reason}" if picked else facts.backend_reason
    rows.append(Finding(f"backend {facts.requested_backend!r} picks", picked, detail))
    return rows


def gpu_usable(findings: list[Finding]) -> bool:
    """Whether any way of running a model on a GPU is usable."""
    return any(f.usable for f in findings if f.gpu_path)


def diagnose(
    *, engine_cache_dir: Path | None = None, backend: str = "auto", device_id: int = 0
) -> list[Finding]:
    """Every backend and provider on this host: usable or not, and why."""
    return findings_from(
        HostFacts.gather(engine_cache_dir=engine_cache_dir, backend=backend, device_id=device_id)
    )
