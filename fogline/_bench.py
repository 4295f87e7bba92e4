"""``fogline bench …``: measured figures, printed, never asserted.

Each benchmark prints a rich table, or one JSON object with ``--json``. Targets (for a
2-core x86 machine with VNNI) are listed in ``docs/benchmarks.md`` next to what was measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import typer

from fogline._bench_cloud import bench_cloud
from fogline._bench_delta import bench_delta
from fogline._bench_mqtt import bench_mqtt
from fogline._bench_rollout import bench_rollout
from fogline._cli import Status, settle_heap

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)


def _emit(result: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        elif isinstance(value, float):
            table.add_row(prefix, f"{value:,.3f}")
        else:
            table.add_row(prefix, f"{value:,}" if isinstance(value, int) else str(value))

    for key, value in result.items():
        add(key, value)
    Console().print(table)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _raw_sps(session: Any, frames: np.ndarray, batch: int, min_seconds: float) -> float:
    """Samples/s of a bare session over ``frames`` in batches, repeated for ``min_seconds``."""
    name = session.get_inputs()[0].name
    for start in range(0, min(len(frames), 4 * batch), batch):
        session.run(None, {name: frames[start : start + batch]})
    done = 0
    t0 = time.perf_counter()
    while True:
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            session.run(None, {name: chunk})
            done += len(chunk)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def _agent_sps(agent: Any, frames: np.ndarray, batch: int, min_seconds: float) -> float:
    """Samples/s through ``agent.submit_batch`` over ``frames``, repeated for ``min_seconds``."""
    done = 0
    t0 = time.perf_counter()
    while True:
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            agent.submit_batch(chunk)
            done += len(chunk)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def _hybrid_accuracy(
    bundle: Any, edge: Any, cloud: Any, frames: np.ndarray, labels: np.ndarray
) -> float:
    """Accuracy of the edge decisions (drop / exit / cloud tail on the edge's features)."""
    th = bundle.thresholds
    correct = 0
    for start in range(0, len(frames), 64):
        chunk = frames[start : start + 64]
        outs = dict(
            zip(
                [o.name for o in edge.get_outputs()],
                edge.run(None, {bundle.edge.input: chunk}),
                strict=True,
            )
        )
        rel = outs[bundle.edge.filter_output].reshape(-1)
        probs = outs[bundle.edge.exit_output]
        feats = {n: outs[n] for n in bundle.edge.feature_outputs}
        (cloud_probs,) = cloud.run([bundle.cloud.output], feats)
        pred = np.where(
            probs.max(axis=1) >= th.exit_confidence, probs.argmax(1), cloud_probs.argmax(1)
        )
        pred = np.where(rel < th.relevance, -1, pred)
        correct += int(np.sum(pred == labels[start : start + 64]))
    return correct / len(frames)


@contextlib.contextmanager
def _bench_broker(url: str | None) -> Iterator[tuple[str, bool, int | None]]:
    """An external broker, else a private Mosquitto, else the embedded broker: its URL,
    whether it has shared subscriptions, and the pid of a private broker process."""
    if url:
        yield url, True, None
        return
    from fogline._broker import EmbeddedBroker, MosquittoProcess, mosquitto_binary

    if mosquitto_binary():
        with MosquittoProcess() as mosq:
            yield mosq.url, True, mosq.pid
    else:
        with EmbeddedBroker() as emb:
            yield emb.url, False, None


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) another process has used so far; None where ``/proc``
    cannot tell (not Linux, or the process is gone)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_ticks() -> tuple[int, int] | None:
    """All CPU time the kernel has accounted so far and the part of it stolen by the
    hypervisor (``/proc/stat``), in clock ticks; None where ``/proc`` cannot tell."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def _steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the host's CPU time that the hypervisor gave to others meanwhile."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round(100.0 * (after[1] - before[1]) / (after[0] - before[0]), 1)


def _cpu_snapshot(broker_pid: int | None, worker_pids: list[int]) -> dict[str, float | None]:
    workers = [_cpu_s(pid) for pid in worker_pids]
    return {
        "agent": time.process_time(),  # this process: the agent and the offering loop
        "workers": None if None in workers else sum(w for w in workers if w is not None),
        "broker": _cpu_s(broker_pid),
    }


def _cpu_per_item(
    before: dict[str, float | None], after: dict[str, float | None], items: int
) -> dict[str, float | None]:
    """CPU milliseconds per answered item, by process, over the measured window: a figure
    that contention on a shared host distorts far less than latency."""
    out: dict[str, float | None] = {}
    for key, start in before.items():
        end = after[key]
        out[key] = (
            None
            if start is None or end is None or not items
            else round((end - start) * 1000.0 / items, 3)
        )
    parts = list(out.values())
    out["total"] = None if None in parts else round(sum(p for p in parts if p is not None), 3)
    return out


@app.command("edge", short_help="Edge model speed: INT8, FP32, the agent.")
def bench_edge(
    batch: int = typer.Option(32, min=1, help="Frames per onnxruntime run."),
    samples: int = typer.Option(4096, min=64, help="Frames in the measured stream."),
    threads: int = typer.Option(1, min=1, help="onnxruntime intra-op threads."),
    seconds: float = typer.Option(
        3.0, min=0.3, help="Minimum time per measurement, over all its rounds."
    ),
    rounds: int = typer.Option(
        3, min=1, help="Rounds; each measures the INT8 model, the FP32 model and the agent."
    ),
    broker: str | None = typer.Option(None, help="Broker URL; default: a private Mosquitto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Edge model speed: bare onnxruntime vs the full agent pipeline, INT8 vs FP32.

    The three are measured in turn, round after round, and each keeps its best round: a
    shared host's speed moves from one minute to the next, and measuring one after the
    other would put that drift into the ratios.
    """
    from fogline._mqtt import MqttSettings
    from fogline.edge_agent import Agent, AgentConfig, OutboxConfig, RuntimeConfig
    from fogline.reference import BUNDLE_DIR
    from fogline.reference._frames import make_frames
    from fogline.sync import Bundle

    with Status(not as_json, "loading the reference models") as status:
        bundle = Bundle.load(BUNDLE_DIR)
        frames, labels = make_frames(samples, seed=11, split="holdout")
        int8 = _session(bundle.edge_model_path, threads)
        fp32 = _session(bundle.path(bundle.manifest["extra_models"]["edge_fp32"]), threads)
        cloud = _session(bundle.cloud_model_path, threads)

        status.update("hybrid accuracy, INT8 and FP32 edge")
        acc_int8 = _hybrid_accuracy(bundle, int8, cloud, frames, labels)
        acc_fp32 = _hybrid_accuracy(bundle, fp32, cloud, frames, labels)
        per_round = seconds / rounds
        raw_runs: list[float] = []
        fp32_runs: list[float] = []
        agent_runs: list[float] = []
        with (
            tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmpdir,
            _bench_broker(broker) as (url, _shared, _pid),
        ):
            config = AgentConfig(
                site="bench-edge",
                bundle_dir=bundle.root,
                broker=MqttSettings.from_url(url, topic_prefix=f"fogline-bench/{os.getpid()}"),
                cloud_timeout_ms=600_000,
                runtime=RuntimeConfig(threads=threads, max_batch=batch),
                outbox=OutboxConfig(
                    path=Path(tmpdir) / "outbox.db", retry_initial_ms=600_000, retry_max_ms=600_000
                ),
            )
            agent = Agent(config)
            agent.start()
            settle_heap()
            try:
                # one warm pass, then rounds of whole passes
                for start in range(0, min(len(frames), 4 * batch), batch):
                    agent.submit_batch(frames[start : start + batch])
                for k in range(rounds):
                    status.update(f"round {k + 1} of {rounds}: INT8, FP32, the agent")
                    raw_runs.append(_raw_sps(int8, frames, batch, per_round))
                    fp32_runs.append(_raw_sps(fp32, frames, batch, per_round))
                    agent_runs.append(_agent_sps(agent, frames, batch, per_round))
                stats = agent.stats()
            finally:
                agent.stop()
    raw_sps, fp32_sps, agent_sps = max(raw_runs), max(fp32_runs), max(agent_runs)
    result = {
        "ort_raw_sps": round(raw_sps, 1),
        "agent_sps": round(agent_sps, 1),
        "agent_vs_raw": round(agent_sps / raw_sps, 3),
        "fp32_raw_sps": round(fp32_sps, 1),
        "int8_vs_fp32_speedup": round(raw_sps / fp32_sps, 3),
        "accuracy_int8": round(acc_int8, 4),
        "accuracy_fp32": round(acc_fp32, 4),
        "int8_accuracy_delta": round(abs(acc_fp32 - acc_int8) * 100, 3),
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "forwarded_share": round(int(stats["forwarded"]) / max(1, int(stats["inputs"])), 4),
    }
    _emit(result, as_json, "fogline bench edge")


def _start_workers(
    n: int, url: str, shared: bool, prefix: str, tmp: Path, batch: int, delay_ms: float
) -> list[tuple[subprocess.Popen[bytes], int]]:
    from fogline._broker import free_port

    procs = []
    for i in range(n):
        port = free_port()
        conf = tmp / f"cloud-{i}.toml"
        conf.write_text(
            "\n".join(
                [
                    f'share_group = "{"bench" if shared else ""}"',
                    f'worker_id = "bench-worker-{i}"',
                    "[broker]",
                    f'url = "{url}"',
                    f'topic_prefix = "{prefix}"',
                    f'client_id = "bench-worker-{i}"',
                    "[batching]",
                    f"max_batch_size = {batch}",
                    f"max_queue_delay_ms = {delay_ms}",
                    "[store]",
                    f'url = "sqlite:///{tmp}/results-{i}.db"',
                    "[http]",
                    f"port = {port}",
                ]
            )
            + "\n"
        )
        log = (tmp / f"cloud-{i}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fogline", "cloud", "serve", "--config", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append((proc, port))
    for proc, port in procs:
        _wait_ready(proc, port)
    return procs


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cloud worker exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("cloud worker did not become ready in time")


@app.command("e2e", short_help="Edge → cloud → edge round trips at a fixed rate.")
def bench_e2e(
    rate: float = typer.Option(1000.0, min=1.0, help="Offered samples per second."),
    seconds: float = typer.Option(5.0, min=1.0, help="How long to offer load (measured)."),
    warmup_s: float = typer.Option(
        1.0, min=0.0, help="Load offered at the same rate before measuring (not counted)."
    ),
    workers: int = typer.Option(1, min=1, max=8, help="Cloud worker processes."),
    max_batch: int = typer.Option(32, min=1, help="Cloud batcher max_batch_size."),
    max_delay_ms: float = typer.Option(
        0.0,
        min=0.0,
        help="Cloud batcher max_queue_delay_ms. 0 batches what waits: single items arrive "
        "1 ms apart here, so waiting for company only adds latency.",
    ),
    broker: str | None = typer.Option(None, help="Broker URL; default: a private Mosquitto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Edge → broker → cloud → edge round trips at a fixed offered rate.

    Every sample is a digit frame and the agent's thresholds send every one of them to the
    cloud, so each measured latency is a full round trip through the broker and a worker.
    Inputs are submitted one at a time, each at its scheduled instant; answers are
    collected by callbacks, as an application would, not held until the end.
    """
    from fogline._mqtt import MqttSettings
    from fogline.edge_agent import Agent, AgentConfig, OutboxConfig
    from fogline.reference import BUNDLE_DIR
    from fogline.reference._frames import make_frames
    from fogline.sync import Bundle, Thresholds

    with Status(not as_json, "starting the broker, the workers and the agent") as status:
        bundle = Bundle.load(BUNDLE_DIR)
        total = int(rate * seconds)
        frames, _labels = make_frames(min(total, 4096), seed=13, p_digit=1.0, split="holdout")
        prefix = f"fogline-bench/{os.getpid()}"
        with (
            tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmpdir,
            _bench_broker(broker) as (url, shared, broker_pid),
        ):
            tmp = Path(tmpdir)
            procs = _start_workers(workers, url, shared, prefix, tmp, max_batch, max_delay_ms)
            agent = Agent(
                AgentConfig(
                    site="bench-e2e",
                    bundle_dir=bundle.root,
                    broker=MqttSettings.from_url(url, topic_prefix=prefix),
                    thresholds=Thresholds(relevance=0.0, exit_confidence=1.0),
                    cloud_timeout_ms=30_000,
                    outbox=OutboxConfig(path=tmp / "outbox.db"),
                )
            )
            agent.start()
            try:
                for i in range(20):  # load every lazy path once
                    agent.submit_batch(frames[i : i + 1])[0].result(timeout=30)
                settle_heap()
                host_cpu_ms = _host_cpu_ms()
                if warmup_s > 0:
                    status.update(f"warming up: {warmup_s:g} s at {rate:g}/s")
                    _offer(agent, frames, rate, int(rate * warmup_s))
                status.update(f"measuring: {seconds:g} s at {rate:g}/s")
                worker_pids = [proc.pid for proc, _port in procs]
                before, cpu_before = agent.stats(), _cpu_snapshot(broker_pid, worker_pids)
                ticks_before = _host_ticks()
                run = _offer(agent, frames, rate, total)
                ticks_after = _host_ticks()
                after, cpu_after = agent.stats(), _cpu_snapshot(broker_pid, worker_pids)
            finally:
                agent.stop()
                for proc, _port in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc, _port in procs:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    forwarded = after["forwarded"] - before["forwarded"]
    bytes_sent = after["bytes_sent"] - before["bytes_sent"]
    per_forwarded = bytes_sent / forwarded if forwarded else 0.0
    raw_per_frame = int(frames[0].nbytes)
    result = {
        "offered_sps": rate,
        "samples": total,
        "answered_by_cloud": len(run.cloud_ms),
        "answered_at_edge": run.edge,
        "failed": run.failed,
        "shed": run.shed,
        "throughput_sps": round((len(run.cloud_ms) + run.edge) / run.elapsed_s, 1),
        "latency_ms": _percentiles(run.cloud_ms),
        # until the caller's done-callback runs (latency_ms ends as the answer arrives)
        "caller_latency_ms": _percentiles(run.caller_ms),
        "cpu_ms_per_item": _cpu_per_item(cpu_before, cpu_after, len(run.cloud_ms) + run.edge),
        "bytes_per_forwarded": round(per_forwarded, 1),
        "reduction_vs_raw": round(raw_per_frame / per_forwarded, 1) if per_forwarded else 0.0,
        "workers": workers,
        "max_queue_delay_ms": max_delay_ms,
        "warmup_s": warmup_s,
        "host_cpu_ms": host_cpu_ms,
        "host_steal_pct": _steal_pct(ticks_before, ticks_after),
        "broker": "external" if broker else ("mosquitto" if shared else "embedded"),
    }
    _emit(result, as_json, "fogline bench e2e")


def _host_cpu_ms() -> float:
    """CPU time of a fixed pure-Python loop, best of three: how fast this host is right
    now. A shared virtual machine's speed can change by a factor of two or three from one
    minute to the next, and a latency figure means little without it."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        total = 0
        for i in range(300_000):
            total += i * i
        best = min(best, time.process_time() - t0)
    return round(best * 1000.0, 1)


def _percentiles(ms: list[float]) -> dict[str, float]:
    lat = np.asarray(ms or [0.0])
    return {
        "p50": round(float(np.percentile(lat, 50)), 3),
        "p99": round(float(np.percentile(lat, 99)), 3),
        "max": round(float(lat.max()), 3),
    }


@dataclasses.dataclass
class _Offered:
    cloud_ms: list[float]  # each answer's latency_ms: submit to the answer's arrival
    caller_ms: list[float]  # submit to the caller's future resolving (after the outbox delete)
    edge: int
    failed: int
    shed: int  # refused at submit: the agent's input queue was full
    elapsed_s: float


def _offer(agent: Any, frames: np.ndarray, rate: float, n: int) -> _Offered:
    """Submit ``n`` frames one at a time at ``rate`` per second; wait for every answer.

    Answers are taken by done-callbacks: keeping thousands of futures alive would make
    the garbage collector's full passes (tens of ms, every thread stopped) part of what
    is measured.
    """
    from fogline.edge_agent import OverloadedError

    cloud_ms: list[float] = []
    caller_ms: list[float] = []
    counts = {"edge": 0, "failed": 0, "shed": 0, "left": n}
    lock = threading.Lock()
    done = threading.Event()

    def collect(submitted: float, fut: Future[Any]) -> None:
        resolved = time.perf_counter()
        try:
            answer = fut.result()
        except Exception:  # noqa: BLE001 - counted, reported
            answer = None
        with lock:
            if answer is None:
                counts["failed"] += 1
            elif answer.source == "cloud":
                cloud_ms.append(answer.latency_ms)
                caller_ms.append((resolved - submitted) * 1000.0)
            else:
                counts["edge"] += 1
            counts["left"] -= 1
            if counts["left"] == 0:
                done.set()

    if n == 0:
        return _Offered([], [], 0, 0, 0, 0.0)
    t0 = time.perf_counter()
    period = 1.0 / rate
    for i in range(n):
        wait = t0 + i * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        submitted = time.perf_counter()
        try:
            fut = agent.submit(frames[i % len(frames)])
        except OverloadedError:  # the agent sheds what it cannot queue: counted
            with lock:
                counts["shed"] += 1
                counts["left"] -= 1
                if counts["left"] == 0:
                    done.set()
            continue
        fut.add_done_callback(functools.partial(collect, submitted))
    if not done.wait(120):
        with lock:
            counts["failed"] += counts["left"]
    elapsed = time.perf_counter() - t0
    return _Offered(cloud_ms, caller_ms, counts["edge"], counts["failed"], counts["shed"], elapsed)


@app.command("faults", short_help="Loss and recovery under scripted faults.")
def bench_faults(
    items: int = typer.Option(5000, min=100, help="Items to offer (every one is forwarded)."),
    rate: float = typer.Option(
        250.0, min=0.0, help="Offered rate, items/s (0: as fast as possible)."
    ),
    broker_down_s: float = typer.Option(10.0, min=0.0, help="How long the broker stays down."),
    workers: int = typer.Option(2, min=1, help="Cloud worker processes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Scripted faults through real processes: the broker killed at 30% of the items and
    restarted after --broker-down-s, a worker SIGKILLed at 60%, the agent SIGKILLed and
    restarted on its outbox at 80%. Prints offered, answered, lost, duplicates, evicted
    and the longest recovery (fault to every earlier item answered)."""
    from fogline._broker import mosquitto_binary
    from fogline._faults import FaultPlan, run_scenario

    if mosquitto_binary() is None:
        from fogline._cli import fail

        fail("fogline bench faults needs the mosquitto binary (apt install mosquitto)")
    plan = FaultPlan(items=items, rate_per_s=rate, broker_down_s=broker_down_s, workers=workers)
    with tempfile.TemporaryDirectory(prefix="fogline-faults-") as tmp:
        report = run_scenario(plan, Path(tmp), progress=not as_json)
    out = report.to_dict()
    faults = out.pop("faults")
    result: dict[str, Any] = {
        "offered": out["offered"],
        "answered": out["answered"],
        "lost": out["lost"],
        "duplicates": out["duplicates"],
        "evicted": out["evicted"],
        "max_recovery_s": out["max_recovery_s"],
        "failed": out["failed"],
        "evicted_counter": out["evicted_counter"],
        "busy_replies": out["busy_replies"],
        "resends": out["resends"],
        "redelivered": out["redelivered"],
        "elapsed_s": out["elapsed_s"],
        "recovery_s": {f["kind"]: f["recovery_s"] for f in faults},
    }
    _emit(result, as_json, "fogline bench faults")
    if result["lost"] or result["duplicates"]:
        raise typer.Exit(1)


app.command("cloud", short_help="Inference API throughput, batching off and on.")(bench_cloud)
app.command("mqtt", short_help="MQTT round trips and QoS 1 throughput.")(bench_mqtt)
app.command("rollout", short_help="Rollout service and fleet store, simulated sites.")(
    bench_rollout
)
app.command("delta", short_help="Bytes a site downloads when a bundle changes.")(bench_delta)
