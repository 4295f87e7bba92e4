"""``fogline bench cloud``: Open Inference Protocol throughput with batching off and on.

The reference MLP (:mod:`fogline.cloud_service._reference_mlp`, 256 FP32 features, about
2.6 million parameters) is written twice into a temporary Triton-layout repository: ``mlp``
with the default config (dynamic batching up to 32 rows) and ``mlp_nobatch`` with
``max_batch_size = 0`` (one request per model run). Both are served by one
:class:`~fogline.cloud_service.ModelRepository` (onnxruntime, one intra-op thread) behind
the inference API on a real uvicorn server in a child process on a loopback port, and
batch-1 requests are sent over HTTP at concurrency 1 and 16.

The client shares the machine's cores with the server (two on the reference machine), so
its own CPU cost lowers the figures; it is kept lean for that reason: one keep-alive
``httpx.AsyncClient`` per case and a request body (binary tensor data extension) built
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import typer

__all__ = ["bench_cloud"]

#: Concurrency levels measured, as ``c<n>`` keys in the result.
CONCURRENCIES = (1, 16)
#: Batching on ÷ off at concurrency 16 that the cloud service aims for.
TARGET_BATCHING_GAIN = 2.5
_BATCHING = "mlp"
_NO_BATCHING = "mlp_nobatch"
_FEATURES = 256


def _serve_forever(repo_dir: str, port: int) -> None:
    """The server process: both models behind the inference API until SIGTERM."""
    import uvicorn

    from fogline._cli import settle_heap
    from fogline.cloud_service._backends import select_backend
    from fogline.cloud_service._oip_app import create_inference_app
    from fogline.cloud_service._repository import ModelRepository

    repository = ModelRepository(repo_dir, backend=select_backend("onnxruntime"), threads=1)
    with repository:
        repository.start()
        app = create_inference_app(repository, auth=None, insecure_no_auth=True)
        settle_heap()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def _serve(repo_dir: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """A server process for ``repo_dir`` on a free loopback port; yields its URL once
    ``/v2/health/ready`` answers 200, and stops it afterwards.

    A separate process rather than a thread so that the client's Python does not compete
    with the server's for one interpreter lock: that would measure the lock, not the
    server.
    """
    import httpx

    from fogline._broker import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A fresh interpreter (not multiprocessing) so that it works whatever the main module.
    code = (
        "from fogline._bench_cloud import _serve_forever; "
        f"_serve_forever({str(repo_dir)!r}, {port})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the inference server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the inference server was not ready in {timeout_s:.0f} s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _request_body() -> tuple[bytes, dict[str, str]]:
    """One batch-1 request in the binary tensor data form, built once per benchmark."""
    from fogline.cloud_service._oip import BINARY_HEADER
    from fogline.cloud_service._reference_mlp import REFERENCE_MLP_INPUT, REFERENCE_MLP_OUTPUT

    x = np.random.default_rng(0).standard_normal((1, _FEATURES)).astype("<f4")
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": REFERENCE_MLP_INPUT,
                    "shape": [1, _FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": REFERENCE_MLP_OUTPUT, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    headers = {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}
    return header + raw, headers


async def _load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    concurrency: int,
    warmup_s: float,
    seconds: float,
) -> tuple[int, float, list[float]]:
    """``concurrency`` loops posting ``body`` back to back: ``warmup_s`` unrecorded, then
    ``seconds`` recorded; returns (requests, elapsed s, latencies ms)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def loop(until: float, latencies: list[float] | None) -> None:
            while True:
                start = time.perf_counter()
                if start >= until:
                    return
                response = await client.post(url, content=body, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"POST {url} answered {response.status_code}: {response.text[:200]}"
                    )
                if latencies is not None:
                    latencies.append((time.perf_counter() - start) * 1000.0)

        warm_until = time.perf_counter() + warmup_s
        await asyncio.gather(*(loop(warm_until, None) for _ in range(concurrency)))
        latencies: list[float] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(t0 + seconds, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return len(latencies), elapsed, latencies


def _figures(done: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    lat = np.asarray(latencies or [0.0])
    return {
        "rps": round(done / elapsed, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
        },
    }


def bench_cloud(
    seconds: float = typer.Option(5.0, min=0.1, help="Measured time per case."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Inference API requests/s and latency for the reference MLP, batching off and on.

    Batch-1 requests over HTTP at concurrency 1 and 16 against ``mlp_nobatch``
    (``max_batch_size = 0``) and ``mlp`` (default dynamic batching); ``batching_gain`` is
    requests/s with batching ÷ without, at concurrency 16. The client shares the machine's
    cores with the server (see the module docstring).
    """
    from fogline._bench import _emit
    from fogline.cloud_service._reference_mlp import reference_mlp_weights, write_reference_mlp

    warmup_s = min(1.0, seconds)
    body, headers = _request_body()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fogline-bench-cloud-") as tmp:
        repo_dir = Path(tmp)
        write_reference_mlp(repo_dir, name=_BATCHING)
        write_reference_mlp(repo_dir, name=_NO_BATCHING, config_toml="max_batch_size = 0\n")
        with _serve(repo_dir) as base:
            for key, model in (("batching_off", _NO_BATCHING), ("batching_on", _BATCHING)):
                url = f"{base}/v2/models/{model}/infer"
                result[key] = {
                    f"c{c}": _figures(*asyncio.run(_load(url, body, headers, c, warmup_s, seconds)))
                    for c in CONCURRENCIES
                }
    top = f"c{CONCURRENCIES[-1]}"
    off = result["batching_off"][top]["rps"]
    result["batching_gain"] = round(result["batching_on"][top]["rps"] / off, 3) if off else 0.0
    result["target_batching_gain"] = TARGET_BATCHING_GAIN
    result["model_params"] = sum(w.size + b.size for w, b in reference_mlp_weights())
    _emit(result, as_json, "fogline bench cloud")
