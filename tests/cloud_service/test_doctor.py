"""``fogline cloud doctor``: the real diagnosis of this host, and every verdict from
hand-made facts (GPU hosts included)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fogline._cli_cloud import doctor_command
from fogline.cloud_service._doctor import (
    Finding,
    HostFacts,
    diagnose,
    findings_from,
    gpu_usable,
)

ALL_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("doctor")(doctor_command)

    @app.command("other")  # a second command keeps "doctor" a subcommand, as in the real CLI
    def other() -> None: ...

    return app


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def facts(tmp_path: Path, **changes: object) -> HostFacts:
    """A CPU-only host: onnxruntime (CPU build), torch without CUDA, no tensorrt."""
    base = HostFacts(
        tensorrt_version=None,
        tensorrt_problem="the tensorrt package is not installed",
        tensorrt_has_fp16_flag=None,
        torch_version="2.13.0+cpu",
        cuda_device=None,
        nvidia_smi=None,
        ort_version="1.32.0",
        ort_providers=("CPUExecutionProvider",),
        ort_distributions={"onnxruntime": "1.32.0"},
        fp16_converter_problem=None,
        engine_cache_dir=tmp_path / "engines",
        engine_cache_problem=None,
        requested_backend="auto",
        backend_kind="onnxruntime",
        backend_reason="native TensorRT unavailable (…); providers CPUExecutionProvider",
        torch_cuda_problem="no NVIDIA driver on this host",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def host_has_gpu_path() -> bool:
    return gpu_usable(diagnose())


def test_the_doctor_on_this_host_lists_every_backend_and_provider(tmp_path: Path) -> None:
    rows = by_check(diagnose(engine_cache_dir=tmp_path / "engines"))
    assert set(rows) == {
        "cuda device",
        "tensorrt (native)",
        "tensorrt fp16",
        "torch (CUDA graphs)",
        "onnxruntime",
        "onnxruntime TensorrtExecutionProvider",
        "onnxruntime CUDAExecutionProvider",
        "onnxruntime CPUExecutionProvider",
        "engine cache",
        "backend 'auto' picks",
    }
    assert rows["onnxruntime CPUExecutionProvider"].usable
    assert rows["engine cache"].detail == f"{tmp_path / 'engines'} (will be created)"
    assert not (tmp_path / "engines").exists()  # looking creates nothing
    picked = rows["backend 'auto' picks"]
    assert picked.usable
    assert picked.detail.startswith(("onnxruntime: ", "tensorrt: ", "torch: "))
    for row in rows.values():
        assert row.detail, row


@pytest.mark.skipif(host_has_gpu_path(), reason="this host has a usable GPU path")
def test_on_a_cpu_host_the_doctor_says_why_each_gpu_path_is_unusable() -> None:
    rows = by_check(diagnose())
    assert not rows["cuda device"].usable
    assert rows["cuda device"].detail.startswith("none visible: ")
    assert not rows["tensorrt (native)"].usable
    assert not rows["torch (CUDA graphs)"].usable
    assert rows["backend 'auto' picks"].detail.startswith(
        "onnxruntime: native TensorRT unavailable"
    )


@pytest.mark.skipif(host_has_gpu_path(), reason="this host has a usable GPU path")
def test_the_command_prints_a_table_and_exits_0_or_1_with_require_gpu() -> None:
    runner = CliRunner()
    result = runner.invoke(cli(), ["doctor"], env={"COLUMNS": "240"})  # rows unwrapped
    assert result.exit_code == 0, result.output
    for text in ("fogline cloud doctor", "tensorrt (native)", "CPUExecutionProvider"):
        assert text in result.output
    assert "No GPU path is usable here" in result.output
    assert "pip install 'fogline[gpu]'" in result.output  # not eaten as rich markup
    strict = runner.invoke(cli(), ["doctor", "--require-gpu"])
    assert strict.exit_code == 1


def test_the_command_prints_one_json_object(tmp_path: Path) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(f'backend = "onnxruntime"\n[tensorrt]\nengine_cache_dir = "{tmp_path}"\n')
    result = CliRunner().invoke(cli(), ["doctor", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"findings", "gpu_usable"}
    rows = {f["check"]: f for f in report["findings"]}
    assert set(rows["onnxruntime"]) == {"check", "usable", "detail", "gpu_path"}
    assert rows["engine cache"] == {
        "check": "engine cache",
        "usable": True,
        "detail": f"{tmp_path} (writable)",
        "gpu_path": False,
    }
    assert rows["backend 'onnxruntime' picks"]["detail"].startswith(
        "onnxruntime: requested in the configuration"
    )


def test_a_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text('backend = "cuda"\n')
    result = CliRunner().invoke(cli(), ["doctor", "--config", str(config)])
    assert result.exit_code == 2
    assert "backend must be one of auto, onnxruntime, tensorrt" in result.output


def test_a_cpu_only_host_has_no_gpu_path_and_names_the_missing_pieces(tmp_path: Path) -> None:
    rows = findings_from(facts(tmp_path))
    assert not gpu_usable(rows)
    got = by_check(rows)
    assert got["cuda device"].detail == (
        "none visible: torch 2.13.0+cpu sees none; nvidia-smi not found (no NVIDIA driver)"
    )
    assert "pip install 'fogline[gpu]'" in got["tensorrt (native)"].detail
    assert got["onnxruntime"].detail == "1.32.0 (CPU build)"
    assert "install onnxruntime-gpu" in got["onnxruntime CUDAExecutionProvider"].detail
    assert [f.check for f in rows if f.gpu_path] == [
        "tensorrt (native)",
        "torch (CUDA graphs)",
        "onnxruntime TensorrtExecutionProvider",
        "onnxruntime CUDAExecutionProvider",
    ]


def test_a_cuda_host_without_tensorrt_has_the_torch_gpu_path(tmp_path: Path) -> None:
    rows = findings_from(
        facts(
            tmp_path,
            torch_version="2.11.0+cu130",
            cuda_device="NVIDIA H200",
            torch_cuda_problem=None,
            backend_kind="torch",
            backend_reason="native TensorRT unavailable (…); torch sees CUDA device NVIDIA H200",
        )
    )
    assert gpu_usable(rows)
    got = by_check(rows)
    assert got["torch (CUDA graphs)"].usable
    assert got["torch (CUDA graphs)"].detail.startswith("torch 2.11.0+cu130 on NVIDIA H200")
    assert got["backend 'auto' picks"].detail.startswith("torch: ")


def test_a_tensorrt_10_host_uses_native_tensorrt_with_the_fp16_flag(tmp_path: Path) -> None:
    rows = findings_from(
        facts(
            tmp_path,
            tensorrt_version="10.9.0.34",
            tensorrt_problem=None,
            tensorrt_has_fp16_flag=True,
            torch_version="2.6.0+cu124",
            cuda_device="NVIDIA L4",
            nvidia_smi="/usr/bin/nvidia-smi",
            backend_kind="tensorrt",
            backend_reason="tensorrt imports and CUDA device NVIDIA L4 is available",
        )
    )
    assert gpu_usable(rows)
    got = by_check(rows)
    assert got["cuda device"] == Finding("cuda device", True, "NVIDIA L4")
    assert got["tensorrt (native)"].detail == "TensorRT 10.9.0.34 on NVIDIA L4"
    assert got["tensorrt fp16"].usable
    assert "BuilderFlag.FP16" in got["tensorrt fp16"].detail


def test_a_tensorrt_11_host_needs_the_onnx_converter_for_fp16(tmp_path: Path) -> None:
    trt11 = facts(
        tmp_path,
        tensorrt_version="11.2.1.2",
        tensorrt_problem=None,
        tensorrt_has_fp16_flag=False,
        cuda_device="NVIDIA L4",
    )
    fp16 = by_check(findings_from(trt11))["tensorrt fp16"]
    assert fp16.usable
    assert "strongly typed: the ONNX is converted to FP16" in fp16.detail
    missing = dataclasses.replace(trt11, fp16_converter_problem="the onnx package is not installed")
    fp16 = by_check(findings_from(missing))["tensorrt fp16"]
    assert not fp16.usable
    assert fp16.detail.endswith("but the onnx package is not installed")


def test_onnxruntime_gpu_providers_need_a_visible_device(tmp_path: Path) -> None:
    gpu_build = facts(
        tmp_path,
        ort_providers=ALL_PROVIDERS,
        ort_distributions={"onnxruntime-gpu": "1.32.0"},
    )
    got = by_check(findings_from(gpu_build))
    assert got["onnxruntime"].detail == "1.32.0 (GPU build)"
    assert got["onnxruntime CUDAExecutionProvider"].detail == (
        "in this build, but no CUDA device is visible"
    )
    with_device = findings_from(dataclasses.replace(gpu_build, cuda_device="NVIDIA A100"))
    assert gpu_usable(with_device)
    trt_ep = by_check(with_device)["onnxruntime TensorrtExecutionProvider"]
    assert trt_ep.usable
    assert f"engines cached under {tmp_path / 'engines'}" in trt_ep.detail


def test_both_onnxruntime_packages_installed_is_flagged(tmp_path: Path) -> None:
    clash = facts(
        tmp_path, ort_distributions={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}
    )
    detail = by_check(findings_from(clash))["onnxruntime"].detail
    assert "onnxruntime and onnxruntime-gpu are both installed" in detail
    gpu_pkg_without_eps = facts(tmp_path, ort_distributions={"onnxruntime-gpu": "1.32.0"})
    cuda = by_check(findings_from(gpu_pkg_without_eps))["onnxruntime CUDAExecutionProvider"]
    assert "not offered by the installed onnxruntime-gpu" in cuda.detail


def test_an_unwritable_engine_cache_and_a_refused_backend_are_reported(tmp_path: Path) -> None:
    rows = by_check(
        findings_from(
            facts(
                tmp_path,
                engine_cache_problem="/srv is not writable by this user",
                requested_backend="tensorrt",
                backend_kind=None,
                backend_reason="TensorRT backend requested but unavailable: no CUDA device",
            )
        )
    )
    assert not rows["engine cache"].usable
    assert "engines would be rebuilt at every start" in rows["engine cache"].detail
    refused = rows["backend 'tensorrt' picks"]
    assert not refused.usable
    assert refused.detail == "TensorRT backend requested but unavailable: no CUDA device"


def test_a_cache_directory_under_a_file_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    rows = by_check(diagnose(engine_cache_dir=tmp_path / "file" / "engines"))
    assert not rows["engine cache"].usable
    assert f"{tmp_path / 'file'} is not a directory" in rows["engine cache"].detail


def test_importing_the_doctor_loads_no_heavy_library() -> None:
    code = (
        "import sys, fogline.cloud_service._doctor; "
        "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'rich') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
