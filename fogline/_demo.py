"""``fogline demo``: the whole data path on one box.

An MQTT broker (embedded, or an external one with ``--broker``), one cloud worker and one
agent per site, all in this process; a stream of camera-like frames is split between the
sites and paced like cameras would send them. At the end: what was dropped, answered at
the edge, forwarded and answered by the cloud; accuracy of the hybrid system against a
cloud-only FP32 run of the full model on the raw frames; bytes; latency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from fogline._cli import Status, fail, settle_heap

__all__ = ["DemoResult", "demo", "run_demo"]


@dataclass
class DemoResult:
    """What one demo run measured."""

    samples: int = 0
    dropped_at_edge: int = 0
    answered_at_edge: int = 0
    forwarded: int = 0
    results: int = 0
    degraded: int = 0
    failed: int = 0
    accuracy_hybrid: float = 0.0
    accuracy_cloud_only: float = 0.0
    bytes_raw: int = 0
    bytes_sent: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    sites: int = 0
    broker: str = ""
    bundle: str = ""
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return self.dropped_at_edge + self.answered_at_edge + self.results

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "dropped_at_edge": self.dropped_at_edge,
            "answered_at_edge": self.answered_at_edge,
            "forwarded": self.forwarded,
            "results": self.results,
            "degraded": self.degraded,
            "failed": self.failed,
            "accuracy_hybrid": round(self.accuracy_hybrid, 4),
            "accuracy_cloud_only": round(self.accuracy_cloud_only, 4),
            "bytes_raw": self.bytes_raw,
            "bytes_sent": self.bytes_sent,
            "sent_vs_raw": round(self.bytes_sent / self.bytes_raw, 5) if self.bytes_raw else 0.0,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "elapsed_s": round(self.elapsed_s, 2),
            "sites": self.sites,
            "broker": self.broker,
            "bundle": self.bundle,
            "failures": self.failures,
        }


@contextlib.contextmanager
def _broker(url: str | None) -> Iterator[tuple[str, bool]]:
    """Yield ``(broker URL, supports shared subscriptions)``."""
    if url:
        yield url, True
        return
    from fogline._broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url, False


def cloud_only_predictions(bundle: Any, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """Predictions of the full FP32 model on the raw frames: -1 where it sees nothing."""
    import onnxruntime as ort

    full = bundle.path(bundle.manifest["extra_models"]["full"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(full), opts, providers=["CPUExecutionProvider"])
    preds = np.empty(len(frames), dtype=np.int64)
    for start in range(0, len(frames), batch):
        relevance, probs = session.run(
            ["relevance", "probs"], {bundle.edge.input: frames[start : start + batch]}
        )
        chunk = np.where(
            relevance.reshape(-1) >= bundle.thresholds.relevance, probs.argmax(axis=1), -1
        )
        preds[start : start + batch] = chunk
    return preds


class _Late:
    """The cloud's final answers for items whose caller got a degraded one first, by
    message id (from the agents' ``on_answer``)."""

    def __init__(self) -> None:
        self._got: dict[str, Any] = {}
        self._cond = threading.Condition()

    def __call__(self, delivery: Any) -> None:
        with self._cond:
            self._got[delivery.message_id] = delivery
            self._cond.notify_all()

    def wait(self, message_id: str, deadline: float) -> Any:
        """The delivery for ``message_id``, or None if none came by ``deadline``."""
        with self._cond:
            self._cond.wait_for(
                lambda: message_id in self._got, max(0.0, deadline - time.monotonic())
            )
            return self._got.get(message_id)


def run_demo(
    *,
    samples: int = 2400,
    sites: int = 3,
    broker_url: str | None = None,
    fps: float = 400.0,
    batch: int = 8,
    seed: int = 7,
    progress: bool = True,
    cloud_timeout_ms: int | None = None,
) -> DemoResult:
    """Run the demo and return its measurements (see the module docstring).
    ``cloud_timeout_ms`` overrides the agents' default (how long a caller waits for the
    cloud before it gets the edge's degraded answer)."""
    from rich.progress import Progress

    from fogline._mqtt import MqttSettings
    from fogline.cloud_service import CloudConfig, CloudWorker, StoreConfig
    from fogline.edge_agent import Agent, AgentConfig, Answer, OutboxConfig
    from fogline.reference import BUNDLE_DIR
    from fogline.reference._frames import make_frames
    from fogline.sync import Bundle

    bundle = Bundle.load(BUNDLE_DIR)
    frames, labels = make_frames(samples, seed=seed, split="holdout")
    result = DemoResult(samples=samples, sites=sites, bundle=bundle.id)
    topic_prefix = f"fogline-demo/{int(time.time() * 1000)}"
    futures: list[Future[Answer]] = [Future() for _ in range(samples)]
    late = _Late()
    started = time.perf_counter()
    starting = Status(progress, f"starting the broker, a cloud worker and {sites} agents")
    with (
        starting,
        tempfile.TemporaryDirectory(prefix="fogline-demo-") as tmp,
        _broker(broker_url) as (
            url,
            shared,
        ),
    ):
        result.broker = "external " + url if broker_url else "embedded (amqtt)"
        mqtt = MqttSettings.from_url(url, topic_prefix=topic_prefix)
        worker = CloudWorker(
            CloudConfig(
                broker=mqtt.with_client_id("fogline-demo-cloud"),
                share_group="fogline-demo" if shared else None,
                bundles=(bundle.root,),
                store=StoreConfig(url=f"sqlite:///{tmp}/results.db"),
            )
        )
        worker.start()

        def timed(config: AgentConfig) -> AgentConfig:
            if cloud_timeout_ms is None:
                return config
            return dataclasses.replace(config, cloud_timeout_ms=cloud_timeout_ms)

        agents = [
            Agent(
                timed(
                    AgentConfig(
                        site=f"site-{i + 1}",
                        bundle_dir=bundle.root,
                        broker=mqtt,
                        outbox=OutboxConfig(path=Path(tmp) / f"outbox-site-{i + 1}.db"),
                    )
                ),
                on_answer=late,
            )
            for i in range(sites)
        ]
        try:
            for agent in agents:
                agent.start()
            settle_heap()
            starting.stop()
            _stream(agents, frames, futures, fps=fps, batch=batch, progress=progress)
            answers: list[Answer | None] = []
            with Progress(transient=True, disable=not progress) as bar:
                task = bar.add_task("waiting for answers", total=samples)
                for fut in futures:
                    try:
                        answers.append(fut.result(timeout=30))
                    except Exception as exc:  # noqa: BLE001 - every failure is counted by type
                        answers.append(None)
                        name = type(exc).__name__
                        result.failures[name] = result.failures.get(name, 0) + 1
                    bar.advance(task)
                # A caller that waited longer than cloud_timeout_ms got the edge's own
                # answer, marked degraded; the cloud's answer follows through on_answer,
                # and only that one counts as the item's answer.
                deadline = time.monotonic() + 30.0
                for i, answer in enumerate(answers):
                    if answer is None or answer.status != "degraded":
                        continue
                    result.degraded += 1
                    final = late.wait(answer.message_id or "", deadline)
                    if final is None or final.answer is None:
                        answers[i] = None
                        name = "NoCloudAnswer" if final is None else type(final.error).__name__
                        result.failures[name] = result.failures.get(name, 0) + 1
                    else:
                        answers[i] = final.answer
            stats = [agent.stats() for agent in agents]
        finally:
            for agent in agents:
                agent.stop()
            worker.stop()
    result.elapsed_s = time.perf_counter() - started
    preds = np.full(samples, -2, dtype=np.int64)
    latencies = []
    for i, answer in enumerate(answers):
        if answer is None:
            result.failed += 1
            continue
        latencies.append(answer.latency_ms)
        if answer.source == "dropped":
            result.dropped_at_edge += 1
            preds[i] = -1
        elif answer.source == "edge":
            result.answered_at_edge += 1
            preds[i] = answer.label if answer.label is not None else -2
        else:
            result.results += 1
            preds[i] = answer.label if answer.label is not None else -2
    result.forwarded = sum(int(s["forwarded"]) for s in stats)
    result.bytes_sent = sum(int(s["bytes_sent"]) for s in stats)
    result.bytes_raw = int(frames.nbytes)
    result.accuracy_hybrid = float(np.mean(preds == labels))
    result.accuracy_cloud_only = float(np.mean(cloud_only_predictions(bundle, frames) == labels))
    lat = np.asarray(latencies or [0.0])
    result.latency_ms = {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }
    return result


def _stream(
    agents: list[Any],
    frames: np.ndarray,
    futures: list[Future[Any]],
    *,
    fps: float,
    batch: int,
    progress: bool,
) -> None:
    """Feed frames round-robin to the sites in small batches, paced at ``fps`` overall."""
    from rich.progress import Progress

    interval = batch / fps if fps > 0 else 0.0
    errors: list[Exception] = []

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("streaming frames", total=len(frames))
        lock = threading.Lock()

        def feed(site_index: int) -> None:
            try:
                starts = range(site_index * batch, len(frames), batch * len(agents))
                t0 = time.perf_counter()
                for k, start in enumerate(starts):
                    delay = t0 + k * interval * len(agents) - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    chunk = frames[start : start + batch]
                    for j, fut in enumerate(agents[site_index].submit_batch(chunk)):
                        _chain(fut, futures[start + j])
                    with lock:
                        bar.advance(task, len(chunk))
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=feed, args=(i,), name=f"feed-{i}") for i in range(len(agents))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def _chain(source: Future[Any], target: Future[Any]) -> None:
    def done(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(f.result())

    source.add_done_callback(done)


def _print_table(result: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(part: int) -> str:
        return f"{part:,}  ({100 * part / result.samples:.1f} %)" if result.samples else "0"

    table = Table(title=f"fogline demo — {result.sites} sites, bundle {result.bundle}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("inputs", f"{result.samples:,}")
    table.add_row("dropped at the edge", pct(result.dropped_at_edge))
    table.add_row("answered at the edge", pct(result.answered_at_edge))
    table.add_row("forwarded to the cloud", pct(result.forwarded))
    table.add_row("answered by the cloud", pct(result.results))
    if result.degraded:
        table.add_row("  of them after a degraded answer", f"{result.degraded:,}")
    if result.failed:
        table.add_row("[red]unanswered[/red]", f"[red]{result.failed:,}[/red]")
    table.add_row("accuracy, hybrid", f"{100 * result.accuracy_hybrid:.2f} %")
    table.add_row("accuracy, cloud-only FP32", f"{100 * result.accuracy_cloud_only:.2f} %")
    table.add_row("bytes if sent raw", f"{result.bytes_raw:,}")
    ratio = 100 * result.bytes_sent / result.bytes_raw if result.bytes_raw else 0.0
    table.add_row("bytes sent", f"{result.bytes_sent:,}  ({ratio:.2f} %)")
    table.add_row("latency p50", f"{result.latency_ms['p50']:.2f} ms")
    table.add_row("latency p99", f"{result.latency_ms['p99']:.2f} ms")
    table.add_row("broker", result.broker)
    table.add_row("elapsed", f"{result.elapsed_s:.1f} s")
    Console().print(table)


def demo(
    samples: int = typer.Option(2400, "--samples", "-n", min=1, help="Frames to stream."),
    sites: int = typer.Option(3, "--sites", min=1, max=64, help="Edge agents (one per site)."),
    broker: str | None = typer.Option(
        None, "--broker", help="Use this broker (mqtt://host:port) instead of the embedded one."
    ),
    fps: float = typer.Option(
        400.0, "--fps", min=0.0, help="Offered frames/s in all; 0: flat out."
    ),
    seed: int = typer.Option(7, "--seed", help="Seed of the frame stream."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Run the whole system on one box: broker, cloud worker, one agent per site."""
    from fogline.cloud_service.errors import BrokerError as CloudBrokerError
    from fogline.edge_agent.errors import BrokerError as AgentBrokerError

    try:
        result = run_demo(
            samples=samples,
            sites=sites,
            broker_url=broker,
            fps=fps,
            seed=seed,
            progress=not as_json,
        )
    except (ValueError, AgentBrokerError, CloudBrokerError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        _print_table(result)
    if result.failed or result.answered != result.samples:
        raise typer.Exit(1)
