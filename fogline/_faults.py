"""Fault injection with real processes: a Mosquitto broker, cloud workers and an agent,
each its own OS process, and the faults real ones suffer (broker restart, SIGKILL).

The agent runs inside a *feeder* process (``python -m fogline._faults feed …``) that is
also the application: it offers items with a tag each and appends every final outcome
it receives (the cloud's answer, a failure, an eviction) to a log file, flushed line by
line so a SIGKILL loses nothing written. Provisional answers (``degraded``) are not final:
the cloud's answer follows through ``on_answer``. The driver (:func:`run_scenario`)
injects the faults on schedule and then reconciles the logs:

* ``offered``: distinct tags the agent accepted (logged after the outbox commit, plus any
  tag that got an outcome, since a SIGKILL can fall between the commit and the log line);
* ``answered`` / ``failed`` / ``evicted``: distinct tags with that final outcome;
* ``lost`` = offered without any final outcome; ``duplicates`` = final outcomes beyond the
  first per tag;
* ``redelivered``: outcomes of items recovered from the outbox that the application had
  already kept (handed out just before a SIGKILL, found again after the restart) and
  therefore skipped, as the agent's ``Delivery.recovered`` asks of it.

Used by ``fogline bench faults`` and by the fault-injection tests.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["FaultPlan", "FaultReport", "run_scenario"]


@dataclass(frozen=True)
class FaultPlan:
    """One scripted scenario. Fractions say when (by items offered) a fault strikes;
    ``None`` leaves that fault out. ``rate_per_s = 0`` offers as fast as the agent takes."""

    items: int = 5000
    rate_per_s: float = 250.0
    workers: int = 2
    broker_restart_at: float | None = 0.3
    broker_down_s: float = 10.0
    worker_kill_at: float | None = 0.6
    agent_kill_at: float | None = 0.8
    outbox_max_items: int = 100_000
    worker_queue_items: int = 10_000
    worker_max_batch: int = 32
    retry_initial_ms: int = 1000
    retry_max_ms: int = 4000
    cloud_timeout_ms: int = 2000
    drain_timeout_s: float = 120.0
    store_url: str | None = None

    def __post_init__(self) -> None:
        if self.items < 1:
            raise ValueError(f"items must be at least 1, got {self.items}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        for name in ("broker_restart_at", "worker_kill_at", "agent_kill_at"):
            at = getattr(self, name)
            if at is not None and not 0.0 < at < 1.0:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {at}")


@dataclass
class FaultReport:
    """What a scenario measured."""

    offered: int = 0
    answered: int = 0
    failed: int = 0
    lost: int = 0
    duplicates: int = 0
    redelivered: int = 0
    evicted: int = 0
    evicted_counter: int = 0
    busy_replies: int = 0
    resends: int = 0
    max_recovery_s: float = 0.0
    elapsed_s: float = 0.0
    faults: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# the driver


def run_scenario(plan: FaultPlan, workdir: Path, *, progress: bool = False) -> FaultReport:
    """Run ``plan`` with its own Mosquitto, workers and feeder under ``workdir``."""
    from fogline._broker import MosquittoProcess

    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    prefix = f"fogline-faults/{os.getpid()}-{int(time.time())}"
    store_url = plan.store_url or f"sqlite:///{workdir}/results.db"
    report = FaultReport()
    started = time.monotonic()
    broker = MosquittoProcess(persistence=True)
    broker.start()
    workers: list[_Proc] = []
    feeder: _Proc | None = None
    try:
        workers = [
            _start_worker(i, broker.url, prefix, store_url, plan, workdir)
            for i in range(plan.workers)
        ]
        for w in workers:
            w.wait_http_ready()
        agent_conf = _agent_config(workdir, broker.url, prefix, plan)
        feeder = _start_feeder(agent_conf, workdir, plan, run=0, start=0)
        schedule = sorted(
            (at, kind)
            for at, kind in (
                (plan.broker_restart_at, "broker_restart"),
                (plan.worker_kill_at, "worker_kill"),
                (plan.agent_kill_at, "agent_kill"),
            )
            if at is not None
        )
        run = 0
        for at, kind in schedule:
            target = int(plan.items * at)
            _wait_offered(
                workdir, target, feeder, timeout_s=plan.items / max(plan.rate_per_s, 50) + 60
            )
            t_fault = time.time()
            if progress:
                print(
                    f"[faults] {kind} at {_count_offered(workdir)} items offered", file=sys.stderr
                )
            if kind == "broker_restart":
                broker.kill()
                time.sleep(plan.broker_down_s)
                broker.start()
            elif kind == "worker_kill":
                victim = workers[0]
                victim.kill()
                workers[0] = _start_worker(
                    0, broker.url, prefix, store_url, plan, workdir, again=True
                )
                workers[0].wait_http_ready()
            else:
                offered_so_far = _max_index(workdir)
                feeder.kill()
                run += 1
                feeder = _start_feeder(agent_conf, workdir, plan, run=run, start=offered_so_far + 1)
            # Recovery runs from when the fault is over: the broker back, the agent process
            # started again; a killed worker is over at once (the other one carries on).
            t_clear = t_fault if kind == "worker_kill" else time.time()
            report.faults.append(
                {"kind": kind, "at_offered": target, "t": t_fault, "t_clear": t_clear}
            )
        code = feeder.wait(plan.drain_timeout_s + plan.items / max(plan.rate_per_s, 50) + 60)
        if code != 0:
            raise RuntimeError(f"the feeder exited with {code}; see {feeder.log}")
    finally:
        if feeder is not None:
            feeder.kill()
        for w in workers:
            w.terminate()
        broker.stop()
    _reconcile(workdir, report)
    report.elapsed_s = round(time.monotonic() - started, 2)
    return report


def _reconcile(workdir: Path, report: FaultReport) -> None:
    offered_t: dict[str, float] = {}
    for path in sorted(workdir.glob("offered-*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                offered_t.setdefault(parts[0], float(parts[1]))
    outcomes: dict[str, list[tuple[str, float]]] = {}
    for path in sorted(workdir.glob("outcomes-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by SIGKILL; its item is re-delivered
            outcomes.setdefault(rec["tag"], []).append((rec["kind"], float(rec["t"])))
    tags = set(offered_t) | set(outcomes)
    report.offered = len(tags)
    report.answered = sum(1 for o in outcomes.values() if o[0][0] == "answer")
    report.failed = sum(1 for o in outcomes.values() if o[0][0] == "failed")
    report.evicted = sum(1 for o in outcomes.values() if o[0][0] == "evicted")
    report.lost = len(tags - set(outcomes))
    report.duplicates = sum(len(o) - 1 for o in outcomes.values())
    for path in workdir.glob("stats-*.json"):
        with contextlib.suppress(ValueError, OSError):
            stats = json.loads(path.read_text())
            report.evicted_counter += int(stats.get("evicted", 0))
            report.busy_replies += int(stats.get("cloud_busy", 0))
            report.resends += int(stats.get("resends", 0))
            report.redelivered += int(stats.get("redelivered", 0))
    # A fault's recovery: from the moment it is over until every item offered by then
    # (including those offered while it lasted) has its final outcome.
    recoveries = []
    for fault in report.faults:
        clear = fault["t_clear"]
        before = [tag for tag, t in offered_t.items() if t <= clear]
        done = [outcomes[tag][0][1] for tag in before if tag in outcomes]
        recovery = max(0.0, max(done) - clear) if done else 0.0
        recoveries.append(recovery)
        fault["recovery_s"] = round(recovery, 2)
    report.max_recovery_s = round(max(recoveries), 2) if recoveries else 0.0


class _Proc:
    def __init__(self, args: list[str], log: Path, http_port: int | None = None) -> None:
        self.log = log
        self.http_port = http_port
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def wait_http_ready(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://127.0.0.1:{self.http_port}/readyz"
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"process not ready within {timeout_s:g} s; see {self.log}")

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -1

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _start_worker(
    i: int,
    broker_url: str,
    prefix: str,
    store_url: str,
    plan: FaultPlan,
    workdir: Path,
    *,
    again: bool = False,
) -> _Proc:
    from fogline._broker import free_port

    port = free_port()
    conf = workdir / f"cloud-{i}.toml"
    conf.write_text(
        "\n".join(
            [
                'share_group = "faults"',
                f'worker_id = "faults-worker-{i}"',
                "[broker]",
                f'url = "{broker_url}"',
                f'topic_prefix = "{prefix}"',
                f'client_id = "faults-worker-{i}"',
                "[batching]",
                f"max_batch_size = {plan.worker_max_batch}",
                "max_queue_delay_ms = 2",
                f"max_queue_items = {plan.worker_queue_items}",
                "busy_retry_after_ms = 200",
                "[store]",
                f'url = "{store_url}"',
                "[http]",
                f"port = {port}",
            ]
        )
        + "\n"
    )
    log = workdir / "logs" / f"cloud-{i}{'-again' if again else ''}.log"
    args = [sys.executable, "-m", "fogline", "cloud", "serve", "--config", str(conf)]
    return _Proc(args, log, port)


def _agent_config(workdir: Path, broker_url: str, prefix: str, plan: FaultPlan) -> Path:
    conf = workdir / "agent.toml"
    conf.write_text(
        "\n".join(
            [
                'site = "faults-site"',
                f"cloud_timeout_ms = {plan.cloud_timeout_ms}",
                "[thresholds]",
                "relevance = 0.0",  # nothing dropped and nothing answered at the edge:
                "exit_confidence = 1.0",  # every item crosses the broker
                "[broker]",
                f'url = "{broker_url}"',
                f'topic_prefix = "{prefix}"',
                "[outbox]",
                f'path = "{workdir}/outbox.db"',
                f"max_items = {plan.outbox_max_items}",
                f"retry_initial_ms = {plan.retry_initial_ms}",
                f"retry_max_ms = {plan.retry_max_ms}",
                "resend_rate_per_s = 2000",
                "[http]",
                "port = 0",
            ]
        )
        + "\n"
    )
    return conf


def _start_feeder(conf: Path, workdir: Path, plan: FaultPlan, *, run: int, start: int) -> _Proc:
    args = [
        sys.executable,
        "-m",
        "fogline._faults",
        "feed",
        "--config",
        str(conf),
        "--out",
        str(workdir),
        "--run",
        str(run),
        "--start",
        str(start),
        "--items",
        str(plan.items),
        "--rate",
        str(plan.rate_per_s),
        "--drain-timeout",
        str(plan.drain_timeout_s),
    ]
    return _Proc(args, workdir / "logs" / f"feeder-{run}.log")


def _count_offered(workdir: Path) -> int:
    total = 0
    for path in workdir.glob("offered-*.log"):
        with path.open("rb") as f:
            total += sum(1 for _ in f)
    return total


def _max_index(workdir: Path) -> int:
    best = -1
    for path in workdir.glob("offered-*.log"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, IndexError):
                best = max(best, int(line.split()[0].split(":")[1]))
    return best


def _wait_offered(workdir: Path, target: int, feeder: _Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _count_offered(workdir) < target:
        if feeder.poll() is not None:
            raise RuntimeError(f"the feeder exited early; see {feeder.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {target} items offered in {timeout_s:g} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# the feeder (runs in its own process)


class _Outcomes:
    """Appends final outcomes to a file, one flushed JSON line each."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def record(self, tag: str | None, kind: str) -> None:
        if tag is None:
            return
        line = json.dumps({"tag": tag, "kind": kind, "t": time.time()})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _kept_tags(out: Path) -> set[str]:
    """The tags whose outcome an earlier feeder process already logged."""
    tags: set[str] = set()
    for path in out.glob("outcomes-*.jsonl"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                tags.add(json.loads(line)["tag"])
    return tags


def _feed(args: argparse.Namespace) -> int:
    from fogline._cli_agent import with_reference_bundle
    from fogline.edge_agent import (
        Agent,
        Answer,
        CloudFailedError,
        Delivery,
        OutboxEvictedError,
        load_config,
    )
    from fogline.reference._frames import make_frames

    out = Path(args.out)
    pid = os.getpid()
    outcomes = _Outcomes(out / f"outcomes-{args.run}-{pid}.jsonl")
    offered_log = (out / f"offered-{args.run}-{pid}.log").open("a", buffering=1)
    stats_path = out / f"stats-{args.run}-{pid}.json"
    # An item recovered from the outbox may have had its outcome handed out (and logged)
    # just before the previous process was killed: as an application must, this one
    # checks recovered outcomes against what it already kept.
    kept = _kept_tags(out)
    skipped = [0]

    def on_answer(d: Delivery) -> None:
        if d.recovered and d.tag in kept:
            skipped[0] += 1
            return
        if d.answer is not None:
            outcomes.record(d.tag, "answer")
        elif isinstance(d.error, OutboxEvictedError):
            outcomes.record(d.tag, "evicted")
        else:
            outcomes.record(d.tag, "failed")

    def on_done(tag: str, fut: Future[Answer]) -> None:
        exc = fut.exception()
        if exc is None:
            if fut.result().status == "ok":
                outcomes.record(tag, "answer")
            # degraded: provisional; the final answer comes through on_answer
        elif isinstance(exc, OutboxEvictedError):
            outcomes.record(tag, "evicted")
        elif isinstance(exc, CloudFailedError):
            outcomes.record(tag, "failed")
        # timeouts, unavailability, shutdown: the item stays in the outbox

    config = with_reference_bundle(load_config(args.config))
    agent = Agent(config, on_answer=on_answer)
    agent.start(wait_connected=False)
    frames, _labels = make_frames(64, seed=5, p_digit=1.0)
    stop_stats = threading.Event()

    def write_stats() -> None:
        while not stop_stats.wait(0.25):
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**agent.stats(), "redelivered": skipped[0]}))
            tmp.replace(stats_path)

    threading.Thread(target=write_stats, daemon=True).start()
    batch = 256 if args.rate <= 0 else max(1, min(32, int(args.rate / 100)))
    interval = 0.0 if args.rate <= 0 else batch / args.rate
    next_t = time.monotonic()
    i = args.start
    try:
        while i < args.items:
            n = min(batch, args.items - i)
            tags = [f"{args.run}:{k}" for k in range(i, i + n)]
            chunk = frames[[k % len(frames) for k in range(i, i + n)]]
            futures = agent.submit_batch(chunk, tags=tags)
            now = time.time()
            offered_log.write("".join(f"{tag} {now:.6f}\n" for tag in tags))
            offered_log.flush()
            for tag, fut in zip(tags, futures, strict=True):
                fut.add_done_callback(functools.partial(on_done, tag))
            i += n
            if interval:
                next_t += interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        deadline = time.monotonic() + args.drain_timeout
        while not agent.drained() and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = agent.drained()
    finally:
        stop_stats.set()
        stats_path.write_text(json.dumps({**agent.stats(), "redelivered": skipped[0]}))
        agent.stop()
        outcomes.close()
        offered_log.close()
    return 0 if drained else 3


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fogline._faults")
    sub = parser.add_subparsers(dest="cmd", required=True)
    feed = sub.add_parser("feed", help="run an agent as the application of a fault scenario")
    feed.add_argument("--config", required=True)
    feed.add_argument("--out", required=True)
    feed.add_argument("--run", type=int, default=0)
    feed.add_argument("--start", type=int, default=0)
    feed.add_argument("--items", type=int, required=True)
    feed.add_argument("--rate", type=float, default=250.0)
    feed.add_argument("--drain-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    return _feed(args)


if __name__ == "__main__":
    sys.exit(_main())
