"""The GPU check: run on a lent GPU machine with that machine's own ``python3``.

Usage, from the repository root: ``python3 build/gpu-check/gpu_check.py`` (``make gpu-check``
prepares that folder: this script and ``wheels/``, the cp312 wheels the machine lacks).

On a host without an NVIDIA GPU it prints ``{"gpu": false, ...}`` and exits 0, so it is
harmless anywhere. On a GPU host it

1. installs ``wheels/*.whl`` with ``--no-deps`` into a temporary ``--target`` folder (no
   index: that machine reaches nothing; ``--no-deps`` because its onnxruntime 1.30 is older
   than pyproject's pin and is good enough for these checks);
2. lays the repository out as installed (``fogline/<package>`` symlinks, as ``make
   typecheck`` does), since the editable install does not travel, and puts both folders on
   ``PYTHONPATH`` (``PYTHONSAFEPATH`` keeps the checkout's own ``fogline/`` folder, which
   lacks the subpackages, off ``sys.path``);
3. runs the GPU-marked tests of the backends (torch with CUDA graphs; TensorRT's skip
   where it is not installed) and ``fogline bench cloud`` on each GPU backend present
   (torch, and TensorRT where it imports) plus onnxruntime on the CPU for comparison;
4. prints ONE JSON object on stdout and exits 0 when every step passed, 1 otherwise.

Logs go to ``$OUT`` when set (the device tool brings that folder back), else to a temporary
folder named in the summary. The whole run keeps within ``--budget-s`` (default 450 s);
steps that would start after it are reported as skipped. Standard library only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGES = ("edge_agent", "cloud_service", "sync", "compression", "residency", "messaging")
TESTS = (
    "tests/cloud_service/test_torch_backend.py",
    "tests/cloud_service/test_tensorrt.py",
    "tests/cloud_service/test_backends.py",
)


def gpu_name() -> str | None:
    """The first GPU nvidia-smi lists, or None where there is no NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if names else None


class Run:
    """The steps' shared state: the deadline, the environment, where logs go."""

    def __init__(self, repo: Path, logs: Path, budget_s: float) -> None:
        self.repo = repo
        self.logs = logs
        self.deadline = time.monotonic() + budget_s
        self.env = dict(os.environ)
        self.ok = True

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(
        self, name: str, argv: list[str], *, timeout_s: float, cwd: Path | None = None
    ) -> dict[str, Any]:
        """Run ``argv`` with its output in ``<logs>/<name>.log``; what happened, as a dict."""
        limit = min(timeout_s, self.left() - 5)
        if limit < 10:
            self.ok = False
            return {"status": "skipped", "why": "the time budget is spent"}
        log = self.logs / f"{name}.log"
        started = time.monotonic()
        with log.open("w", encoding="utf-8") as fh:
            try:
                proc = subprocess.run(
                    argv,
                    cwd=cwd or self.repo,
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=fh,
                    text=True,
                    timeout=limit,
                    check=False,
                )
                stdout, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout or ""
                stdout = out.decode() if isinstance(out, bytes) else out
                rc = None
            fh.write(stdout)
        result: dict[str, Any] = {
            "status": "passed" if rc == 0 else ("timed out" if rc is None else f"exit {rc}"),
            "seconds": round(time.monotonic() - started, 1),
        }
        if rc != 0:
            self.ok = False
            result["log_tail"] = log.read_text(encoding="utf-8", errors="replace")[-1500:]
        result["stdout"] = stdout
        return result


def prepare(run: Run, work: Path) -> dict[str, Any]:
    """Install the wheels and lay the checkout out as an installed ``fogline``."""
    wheels = sorted(glob.glob(str(HERE / "wheels" / "*.whl")))
    site = work / "site"
    src = work / "src"
    (src / "fogline").mkdir(parents=True)
    for entry in (run.repo / "fogline").iterdir():
        (src / "fogline" / entry.name).symlink_to(entry)
    for package in PACKAGES:
        (src / "fogline" / package).symlink_to(run.repo / package)
    run.env["PYTHONPATH"] = os.pathsep.join(
        [str(src), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    run.env["PYTHONSAFEPATH"] = "1"  # no cwd or script folder ahead of PYTHONPATH
    run.env["PYTHONUNBUFFERED"] = "1"
    result: dict[str, Any] = {"wheels": len(wheels)}
    if wheels:
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        install += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
        result |= run.step("install", [*install, *wheels], timeout_s=120)
        result.pop("stdout", None)
    probe = (
        "import json, sys, onnxruntime, torch, fogline.cloud_service._torch_backend; "
        "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
        "'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(), "
        "'onnxruntime': onnxruntime.__version__}))"
    )
    imports = run.step("imports", [sys.executable, "-c", probe], timeout_s=120)
    if imports["status"] == "passed":
        result["versions"] = json.loads(imports["stdout"].strip().splitlines()[-1])
    else:
        imports.pop("stdout", None)
        result["imports"] = imports
    return result


def tests(run: Run, work: Path) -> dict[str, Any]:
    junit = work / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    argv += ["--junitxml", str(junit), *TESTS]
    result = run.step("pytest", argv, timeout_s=240)
    result.pop("stdout", None)
    if junit.exists():
        root = ET.parse(junit).getroot()  # noqa: S314 -- written by our own pytest run
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"]
            counts["passed"] -= counts["skipped"]
            result |= counts
            result["not_passed"] = [
                f"{case.get('name')}: {child.tag}"
                for case in suite.iter("testcase")
                for child in case
                if child.tag in ("failure", "error", "skipped")
            ]
    if result.get("passed", 0) == 0:
        run.ok = False  # a run where every GPU test skipped proves nothing
    return result


def tensorrt_present(run: Run) -> bool:
    probe = "import tensorrt"
    return (
        subprocess.run(
            [sys.executable, "-c", probe], env=run.env, capture_output=True, check=False
        ).returncode
        == 0
    )


def bench(run: Run, work: Path, backend: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "fogline", "bench", "cloud", "--seconds", "1"]
    argv += ["--backend", backend, "--json"]
    result = run.step(f"bench-{backend}", argv, timeout_s=150, cwd=work)
    stdout = result.pop("stdout", "")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if result["status"] == "passed" and lines:
        figures = json.loads(lines[-1])
        result["backend"] = figures.get("backend")
        result["rps"] = {
            mode: {c: figures[mode][c]["rps"] for c in figures[mode]}
            for mode in ("batching_off", "batching_on")
        }
        result["p99_ms"] = {
            mode: {c: figures[mode][c]["latency_ms"]["p99"] for c in figures[mode]}
            for mode in ("batching_off", "batching_on")
        }
        result["batching_gain"] = figures.get("batching_gain")
        reason = str((figures.get("backend") or {}).get("reason", ""))
        if backend == "torch" and "CUDA" not in reason:
            result["status"] = "ran on the CPU, not the GPU"
            run.ok = False
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent.parent)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument(
        "--skip-bench", action="store_true", help="Run the tests only (quicker reruns)."
    )
    args = parser.parse_args()
    started = time.monotonic()
    gpu = gpu_name()
    summary: dict[str, Any] = {"check": "fogline gpu-check", "gpu": gpu is not None}
    if gpu is None:
        summary["reason"] = "no NVIDIA GPU on this host (nvidia-smi absent or lists none)"
        summary["ok"] = True
        print(json.dumps(summary))
        return 0
    summary["device"] = gpu
    out = os.environ.get("OUT")
    work = Path(tempfile.mkdtemp(prefix="fogline-gpu-check-"))
    logs = Path(out) if out else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run = Run(args.repo.resolve(), logs, args.budget_s)
    summary["prepare"] = prepare(run, work)
    summary["tests"] = tests(run, work)
    if not args.skip_bench:
        backends = ["torch", *(["tensorrt"] if tensorrt_present(run) else []), "onnxruntime"]
        summary["tensorrt"] = "importable" if "tensorrt" in backends else "not installed"
        summary["bench_cloud"] = {b: bench(run, work, b) for b in backends}
    summary["ok"] = run.ok
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["logs"] = str(logs)
    text = json.dumps(summary)
    (logs / "summary.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
