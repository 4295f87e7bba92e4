"""``fogline bench cloud``: Open Inference Protocol throughput with batching off and on.

An MLP on 256 FP32 features (:mod:`fogline.reference._mlp`; by default
256 → 4096 → 2048 → 10, about 9.5 million parameters, ``--layers`` picks others) is
written twice into a temporary Triton-layout repository: ``mlp`` with dynamic batching
(up to 32 rows, ``--max-queue-delay-ms``) and ``mlp_nobatch`` with ``max_batch_size = 0``
(one request per model run). Both are served by one
:class:`~fogline.cloud_service.ModelRepository` (onnxruntime with one intra-op thread by
default; ``--backend`` picks torch, TensorRT or auto) behind
the inference API on a real uvicorn server in a child process on a loopback port, and
batch-1 requests are sent over HTTP at concurrency 1 and 16.

Batching pays off in proportion to what the model costs next to the HTTP path: the
2.6-million-parameter reference MLP runs a row in 0.2 ms here, less than the server's
own per-request work, so its gain stays well below the larger model's (see
docs/benchmarks.md for both).

The client shares the machine's cores with the server (two on the reference machine), so
its own CPU cost lowers the figures; it is kept lean for that reason (see :func:`_load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
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


def _serve_forever(repo_dir: str, port: int, backend: str = "onnxruntime") -> None:
    """The server process: both models behind the inference API until SIGTERM."""
    import uvicorn

    from fogline._cli import settle_heap
    from fogline.cloud_service._backends import select_backend
    from fogline.cloud_service._oip_app import create_inference_app
    from fogline.cloud_service._repository import ModelRepository

    repository = ModelRepository(repo_dir, backend=select_backend(backend), threads=1)
    with repository:
        repository.start()
        app = create_inference_app(repository, auth=None, insecure_no_auth=True)
        settle_heap()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def _serve(repo_dir: Path, backend: str, timeout_s: float = 120.0) -> Iterator[str]:
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
        f"_serve_forever({str(repo_dir)!r}, {port}, {backend!r})"
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
    from fogline.reference._mlp import REFERENCE_MLP_INPUT, REFERENCE_MLP_OUTPUT

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
    ``seconds`` recorded; returns (requests, elapsed s, latencies ms).

    Each loop holds one keep-alive HTTP/1.1 connection and writes every request in a
    single send. Hand-written on purpose: on a 2-core machine a general client (httpx
    costs 1-2 ms of CPU per request) would measure itself rather than the server, and a
    client that writes headers and body in two sends meets Nagle's algorithm and the
    server's delayed ACK (40 ms a request).
    """
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {parsed.path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def loop(until: float, latencies: list[float] | None) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                start = time.perf_counter()
                if start >= until:
                    return
                writer.write(request)
                status, payload = await _read_response(reader)
                if status != 200:
                    raise RuntimeError(f"POST {url} answered {status}: {payload[:200]!r}")
                if latencies is not None:
                    latencies.append((time.perf_counter() - start) * 1000.0)
        finally:
            writer.close()

    warm_until = time.perf_counter() + warmup_s
    await asyncio.gather(*(loop(warm_until, None) for _ in range(concurrency)))
    latencies: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(t0 + seconds, latencies) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return len(latencies), elapsed, latencies


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length (what uvicorn sends
    for these answers)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def _figures(done: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    lat = np.asarray(latencies or [0.0])
    return {
        "rps": round(done / elapsed, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
        },
    }


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) < 2 or widths[0] != 256 or any(w < 1 for w in widths):
        from fogline._cli import fail

        fail(f"--layers {text!r} must be positive widths starting with 256, e.g. 256,2048,10")
    return widths


def bench_cloud(
    seconds: float = typer.Option(5.0, min=0.1, help="Measured time per case."),
    max_queue_delay_ms: float = typer.Option(
        1.0, min=0.0, help="The batching model's max_queue_delay_ms (0: batch what waits)."
    ),
    layers: str = typer.Option(
        "256,4096,2048,10",
        help="Widths of the MLP, input first (default: about 9.5 million parameters).",
    ),
    backend: str = typer.Option(
        "onnxruntime",
        help="The model backend: onnxruntime (default, one intra-op thread), tensorrt, torch "
        "(CUDA graphs on a GPU, eager on a CPU) or auto, as `backend` in cloud.toml.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Inference API requests/s and latency for the reference MLP, batching off and on.

    Batch-1 requests over HTTP at concurrency 1 and 16 against two copies of the MLP:
    mlp_nobatch (max_batch_size = 0) and mlp (default dynamic batching). batching_gain is
    requests/s with batching ÷ without, at concurrency 16. The client runs on the same
    machine and shares its cores with the server, so the figures are lower bounds.
    """
    from fogline._bench import _emit
    from fogline._cli import Status, fail
    from fogline.cloud_service import BackendError
    from fogline.cloud_service._backends import select_backend
    from fogline.reference._mlp import reference_mlp_weights, write_reference_mlp

    # Chosen here too, so that a backend this host cannot run is refused before the server
    # starts and the result can say what ran; the server process makes the same choice.
    try:
        choice = select_backend(backend)
    except (BackendError, ValueError) as exc:
        fail(str(exc))
    warmup_s = min(1.0, seconds)
    body, headers = _request_body()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fogline-bench-cloud-") as tmp:
        repo_dir = Path(tmp)
        widths = _widths(layers)
        write_reference_mlp(
            repo_dir,
            name=_BATCHING,
            layers=widths,
            config_toml=f"max_queue_delay_ms = {max_queue_delay_ms}\n",
        )
        write_reference_mlp(
            repo_dir, name=_NO_BATCHING, layers=widths, config_toml="max_batch_size = 0\n"
        )
        with (
            Status(not as_json, "starting the inference API") as status,
            _serve(repo_dir, backend) as base,
        ):
            for key, model in (("batching_off", _NO_BATCHING), ("batching_on", _BATCHING)):
                url = f"{base}/v2/models/{model}/infer"
                result[key] = {}
                for c in CONCURRENCIES:
                    status.update(f"{model}: {seconds:g} s at concurrency {c}")
                    load = _load(url, body, headers, c, warmup_s, seconds)
                    result[key][f"c{c}"] = _figures(*asyncio.run(load))
    top = f"c{CONCURRENCIES[-1]}"
    off = result["batching_off"][top]["rps"]
    result["batching_gain"] = round(result["batching_on"][top]["rps"] / off, 3) if off else 0.0
    result["target_batching_gain"] = TARGET_BATCHING_GAIN
    result["backend"] = {"kind": choice.kind, "reason": choice.reason}
    result["model_params"] = sum(w.size + b.size for w, b in reference_mlp_weights(widths))
    _emit(result, as_json, "fogline bench cloud")
