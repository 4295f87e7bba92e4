"""The edge agent: model, decisions, MQTT, and the answers callers wait for.

Three ways in, one way through (:meth:`Agent._process`):

* :meth:`Agent.submit_batch` runs one model call for a whole batch in the caller's thread
  and returns one future per item — the throughput path.
* :meth:`Agent.submit` queues one input; a model thread takes whatever is queued (up to
  ``runtime.max_batch``) and runs it as one batch, so concurrent single requests share
  model calls.
* ``await`` :meth:`Agent.infer` is :meth:`submit` bridged to the caller's event loop.

Dropped and early-exit items are answered before ``_process`` returns. Forwarded items
are answered on paho's network thread when the cloud's result arrives, or by the
deadline thread after ``cloud_timeout_ms`` with :class:`CloudTimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry

from fogline.compression import Codec, Envelope, Kind, encode_envelope, now_us
from fogline.edge_agent._config import AgentConfig
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent._pipeline import BatchDecision, Decision, decide_batch
from fogline.edge_agent._runtime import EdgeRuntime, InputSpec
from fogline.edge_agent._transport import Transport
from fogline.edge_agent.errors import (
    AgentError,
    AgentPeerError,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    ModelError,
    NotRunningError,
    OverloadedError,
)
from fogline.sync import Bundle, BundleError, Thresholds

__all__ = ["Agent", "Answer", "Source"]

log = logging.getLogger("fogline.edge_agent")

Source = Literal["dropped", "edge", "cloud"]
_DECISION_OF: dict[str, str] = {"dropped": "drop", "edge": "exit", "cloud": "forward"}


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer for one input and where it came from.

    ``source`` is ``dropped`` (the filter judged it empty: no label, nothing left the
    site), ``edge`` (the early-exit head was confident: its argmax and confidence) or
    ``cloud`` (the cloud's label and confidence). The decision inputs (``relevance``,
    ``exit_confidence``; ``None`` when the bundle lacks that head), the ``thresholds`` and
    the ``bundle`` id travel with it. ``latency_ms`` runs from the input's arrival at the
    agent to its answer.
    """

    source: Source
    label: int | None
    confidence: float | None
    relevance: float | None
    exit_confidence: float | None
    thresholds: Thresholds
    bundle: str
    message_id: str | None
    latency_ms: float
    worker: str | None = None
    status: str = "ok"

    @property
    def decision(self) -> str:
        """The edge decision: ``drop``, ``exit`` or ``forward``."""
        return _DECISION_OF[self.source]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "source": self.source,
            "decision": self.decision,
            "label": self.label,
            "confidence": self.confidence,
            "relevance": self.relevance,
            "exit_confidence": self.exit_confidence,
            "thresholds": {
                "relevance": self.thresholds.relevance,
                "exit_confidence": self.thresholds.exit_confidence,
            },
            "bundle": self.bundle,
            "message_id": self.message_id,
            "latency_ms": self.latency_ms,
            "worker": self.worker,
            "status": self.status,
        }


# A forwarded item waiting for the cloud: its future, arrival time (perf_counter),
# relevance and exit confidence.
_Waiting = tuple["Future[Answer]", float, "float | None", "float | None"]
_STOP = object()
_COMPRESS_PROBE_EVERY = 64
_FLAGS_OFFSET = 5  # the envelope's flags byte (docs/wire-format.md)
_FLAG_ZSTD = 0x01
_LOCAL: tuple[tuple[Source, Decision], ...] = (("dropped", Decision.DROP), ("edge", Decision.EXIT))


def _settle(future: Future[Answer], answer: Answer | None, error: BaseException | None) -> None:
    """Resolve a future unless the caller cancelled it meanwhile."""
    try:
        if error is None:
            future.set_result(answer)  # type: ignore[arg-type]
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class Agent:
    """An edge agent for one site.

    ``Agent(config)`` loads and verifies the bundle (cheap); :meth:`start` loads the model,
    warms it up and connects to the broker; :meth:`stop` refuses new inputs, fails what is
    still waiting with :class:`NotRunningError`, and disconnects. Usable as a context
    manager. Thread-safe: any thread may submit.
    """

    def __init__(self, config: AgentConfig, *, registry: CollectorRegistry | None = None) -> None:
        if not isinstance(config, AgentConfig):
            raise TypeError("Agent needs an AgentConfig")
        self.config = config
        try:
            self.bundle = Bundle.load(config.bundle_dir)
        except BundleError as exc:
            raise ModelError(f"bundle at {config.bundle_dir} is unusable: {exc}") from exc
        self.thresholds: Thresholds = config.thresholds or self.bundle.thresholds
        try:
            self.codec: Codec = config.codec or Codec.parse(self.bundle.codec)
        except ValueError as exc:
            raise ModelError(f"bundle {self.bundle.id}: {exc}") from exc
        self.site = config.site
        self.bundle_id = self.bundle.id
        self.metrics = AgentMetrics(registry)
        self.metrics.info.info(
            {"site": self.site, "bundle": self.bundle_id, "codec": self.codec.name.lower()}
        )
        self._transport: Transport[_Waiting] = Transport(
            config.mqtt_settings(), self.site, self._on_result, self.metrics
        )
        self.metrics.pending.set_function(lambda: self._transport.pending_count)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self._runtime: EdgeRuntime | None = None
        self._timeout_s = config.cloud_timeout_ms / 1000.0
        self._zstd_level = self.bundle.zstd_level
        self._features = tuple(self.bundle.edge.feature_outputs)
        self._compress = True
        self._encoded = 0
        self._state: Literal["new", "running", "stopped"] = "new"
        self._accepting = False
        self._active = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.runtime.max_queue)
        self._deadlines: collections.deque[tuple[float, list[bytes]]] = collections.deque()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []

    # lifecycle

    def start(self, *, wait_connected: bool = True) -> Agent:
        """Load and warm up the model, then connect to the broker.

        With ``wait_connected`` (the default), block until the broker accepted the
        connection and the result subscription, or raise :class:`BrokerError` after
        ``broker.connect_timeout_s``. Without it, connect in the background and keep
        retrying: dropped and early-exit inputs are answered meanwhile, and :attr:`ready`
        turns true once connected.
        """
        with self._cond:
            if self._state != "new":
                raise NotRunningError(f"agent for {self.site} was already started; make a new one")
            self._state = "running"
        try:
            self._start(wait_connected)
        except BaseException:
            self.stop()
            raise
        log.info(
            "agent for site %s running bundle %s (codec %s, thresholds relevance %.3g, exit %.3g)",
            self.site,
            self.bundle_id,
            self.codec.name.lower(),
            self.thresholds.relevance,
            self.thresholds.exit_confidence,
        )
        return self

    def _start(self, wait_connected: bool) -> None:
        rt = self.config.runtime
        runtime = EdgeRuntime(
            self.bundle, threads=rt.threads, max_batch=rt.max_batch, warmup_runs=rt.warmup_runs
        )
        runtime.warm_up()
        self._runtime = runtime
        self._threads = [
            threading.Thread(
                target=self._model_loop, name=f"fogline-agent-{self.site}-model", daemon=True
            ),
            threading.Thread(
                target=self._deadline_loop, name=f"fogline-agent-{self.site}-deadlines", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        with self._cond:
            if self._state != "running":
                raise NotRunningError(f"agent for {self.site} was stopped while starting")
            self._accepting = True
        self._transport.start(wait=wait_connected)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new inputs, finish the batches in progress, fail what waits, disconnect."""
        with self._cond:
            if self._state == "stopped":
                return
            was_running = self._state == "running"
            self._state = "stopped"
            self._accepting = False
            self._cond.wait_for(lambda: self._active == 0, timeout_s)
        if not was_running:
            return
        self._halt.set()
        if self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout_s)
        for thread in self._threads:
            thread.join(timeout_s)
        message = f"agent for {self.site} stopped before answering"
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                _settle(item[1], None, NotRunningError(message))
        for waiting in self._transport.take_all():
            _settle(waiting[0], None, NotRunningError(message))
        self._transport.stop()
        log.info("agent for site %s stopped", self.site)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # state

    @property
    def ready(self) -> bool:
        """True when the model is warm, the broker connected and inputs are accepted."""
        rt = self._runtime
        return self._accepting and rt is not None and rt.ready and self._transport.connected

    @property
    def model_ready(self) -> bool:
        """True once the edge model is loaded and warmed up."""
        rt = self._runtime
        return rt is not None and rt.ready

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def connected(self) -> bool:
        return self._transport.connected

    @property
    def registry(self) -> CollectorRegistry:
        """This agent's Prometheus registry (what ``GET /metrics`` serves)."""
        return self.metrics.registry

    @property
    def input_spec(self) -> InputSpec:
        """Name, dtype and item shape of the model input (after :meth:`start`)."""
        if self._runtime is None:
            raise NotRunningError(f"agent for {self.site} is not started")
        return self._runtime.input

    def info(self) -> dict[str, Any]:
        """Site, bundle, codec, thresholds and input of this agent, JSON-ready."""
        out: dict[str, Any] = {
            "site": self.site,
            "bundle": self.bundle_id,
            "codec": self.codec.name.lower(),
            "thresholds": {
                "relevance": self.thresholds.relevance,
                "exit_confidence": self.thresholds.exit_confidence,
            },
            "features_topic": self._transport.features_topic,
            "results_topic": self._transport.results_topic,
            "ready": self.ready,
        }
        if self._runtime is not None:
            out["input"] = dict(self._runtime.describe())
        return out

    def stats(self) -> dict[str, int]:
        """Counters for demos and benchmarks (the same numbers ``/metrics`` exposes)."""
        m = self.metrics
        v = m.value
        return {
            "inputs": int(v("fogline_agent_inputs_total")),
            "dropped": int(v("fogline_agent_decisions_total", {"kind": "drop"})),
            "edge": int(v("fogline_agent_decisions_total", {"kind": "exit"})),
            "forwarded": int(v("fogline_agent_decisions_total", {"kind": "forward"})),
            "cloud_answers": int(v("fogline_agent_cloud_results_total", {"status": "ok"})),
            "cloud_busy": int(v("fogline_agent_cloud_results_total", {"status": "busy"})),
            "cloud_errors": int(v("fogline_agent_cloud_results_total", {"status": "error"})),
            "timeouts": int(v("fogline_agent_cloud_timeouts_total")),
            "bytes_sent": int(v("fogline_agent_bytes_sent_total")),
            "bytes_raw": int(v("fogline_agent_bytes_raw_total")),
            "rejected": int(m.total("fogline_agent_rejected_total")),
            "late_results": int(v("fogline_agent_late_results_total")),
            "shed": int(v("fogline_agent_shed_total")),
            "pending": self._transport.pending_count,
        }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the broker acknowledged every feature envelope published so far."""
        return self._transport.flush(timeout_s)

    # ways in

    def submit(self, sample: Any) -> Future[Answer]:
        """Queue one input (an array of the model's item shape); a future of its answer.

        Raises :class:`InputError` at once for an input that does not fit the model, and
        :class:`OverloadedError` when ``runtime.max_queue`` inputs already wait.
        """
        t0, created_us = time.perf_counter(), now_us()
        rt = self._require_running()
        arr = rt.input.item(sample)
        future: Future[Answer] = Future()
        with self._cond:
            if not self._accepting:
                raise NotRunningError(f"agent for {self.site} is not running")
            try:
                self._queue.put_nowait((arr, future, t0, created_us))
            except queue.Full:
                self.metrics.shed.inc()
                raise OverloadedError(
                    f"{self.config.runtime.max_queue} inputs already wait for the model"
                ) from None
        return future

    async def infer(self, sample: Any) -> Answer:
        """Answer one input, awaiting it on the caller's event loop.

        Cloud answers arrive on paho's thread and are handed to this loop with
        ``call_soon_threadsafe`` (via :func:`asyncio.wrap_future`). Raises the agent's
        errors: :class:`InputError`, :class:`CloudTimeoutError`, :class:`CloudBusyError`, …
        """
        return await asyncio.wrap_future(self.submit(sample))

    def submit_batch(self, samples: Any) -> list[Future[Answer]]:
        """Run a batch (first axis = items) through one model call; one future per item.

        Dropped and early-exit items are resolved when this returns; forwarded items are
        published before it returns and resolve when the cloud answers.
        """
        t0, created_us = time.perf_counter(), now_us()
        rt = self._require_running()
        frames = rt.input.batch(samples)
        n = int(frames.shape[0])
        futures: list[Future[Answer]] = [Future() for _ in range(n)]
        if n == 0:
            return futures
        arrived = [t0] * n
        created = [created_us] * n
        with self._cond:
            if not self._accepting:
                raise NotRunningError(f"agent for {self.site} is not running")
            self._active += 1
        try:
            self._process(frames, futures, arrived, created, uniform=True)
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()
        return futures

    def _require_running(self) -> EdgeRuntime:
        rt = self._runtime
        if rt is None or not self._accepting:
            raise NotRunningError(f"agent for {self.site} is not running")
        return rt

    # the way through

    def _model_loop(self) -> None:
        q = self._queue
        max_batch = self.config.runtime.max_batch
        while True:
            item = q.get()
            if item is _STOP:
                return
            items = [item]
            stop = False
            while len(items) < max_batch:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            frames = np.stack([it[0] for it in items])
            futures = [it[1] for it in items]
            try:
                self._process(
                    frames,
                    futures,
                    [it[2] for it in items],
                    [it[3] for it in items],
                    uniform=False,
                )
            except Exception as exc:
                log.exception("site %s: processing a batch failed", self.site)
                for fut in futures:
                    _settle(fut, None, exc)
            if stop:
                return

    def _process(
        self,
        frames: np.ndarray,
        futures: Sequence[Future[Answer]],
        arrived: Sequence[float],
        created_us: Sequence[int],
        *,
        uniform: bool,
    ) -> None:
        """Run, decide, answer the local items and publish the forwarded ones.

        ``arrived`` (``perf_counter``) and ``created_us`` (wall clock) are per item;
        ``uniform`` says they are the same for every item (one batch that arrived at once),
        so local answers share one latency and one histogram update.
        """
        rt = self._runtime
        if rt is None:
            raise NotRunningError(f"agent for {self.site} is not running")
        n = len(futures)
        try:
            outputs = rt.run(frames)
            decided = decide_batch(
                outputs,
                thresholds=self.thresholds,
                filter_output=self.bundle.edge.filter_output,
                exit_output=self.bundle.edge.exit_output,
                batch_size=n,
            )
        except (AgentError, ValueError) as exc:
            error = exc if isinstance(exc, AgentError) else ModelError(str(exc))
            for fut in futures:
                _settle(fut, None, error)
            return
        n_drop, n_exit, n_fwd = decided.counts()
        m = self.metrics
        m.inputs.inc(n)
        m.bytes_raw.inc(frames.nbytes)
        if n_drop:
            m.drop.inc(n_drop)
        if n_exit:
            m.exit.inc(n_exit)
        if n_fwd:
            m.forward.inc(n_fwd)
        rel = None if decided.relevance is None else decided.relevance.tolist()
        conf = None if decided.exit_confidence is None else decided.exit_confidence.tolist()
        if n_drop or n_exit:
            self._answer_locally(decided, futures, arrived, rel, conf, uniform=uniform)
        if n_fwd:
            self._forward(
                decided,
                outputs=outputs,
                futures=futures,
                arrived=arrived,
                created_us=created_us,
                rel=rel,
                conf=conf,
            )

    def _answer_locally(
        self,
        decided: BatchDecision,
        futures: Sequence[Future[Answer]],
        arrived: Sequence[float],
        rel: list[float] | None,
        conf: list[float] | None,
        *,
        uniform: bool,
    ) -> None:
        now = time.perf_counter()
        th, bundle = self.thresholds, self.bundle_id
        batch_ms = (now - arrived[0]) * 1000.0
        per_item = not uniform
        latency = self.metrics.latency
        labels = None if decided.labels is None else decided.labels.tolist()
        for source, code in _LOCAL:
            idx = decided.indices(code).tolist()
            if not idx:
                continue
            local = source == "edge"
            for i in idx:
                ms = (now - arrived[i]) * 1000.0 if per_item else batch_ms
                c = None if conf is None else conf[i]
                answer = Answer(
                    source,
                    labels[i] if local and labels is not None else None,
                    c if local else None,
                    None if rel is None else rel[i],
                    c,
                    th,
                    bundle,
                    None,
                    ms,
                )
                _settle(futures[i], answer, None)
                if per_item:
                    latency.observe(source, ms / 1000.0)
            if not per_item:
                latency.observe(source, batch_ms / 1000.0, len(idx))

    def _forward(
        self,
        decided: BatchDecision,
        *,
        outputs: dict[str, np.ndarray],
        futures: Sequence[Future[Answer]],
        arrived: Sequence[float],
        created_us: Sequence[int],
        rel: list[float] | None,
        conf: list[float] | None,
    ) -> None:
        idx = decided.indices(Decision.FORWARD).tolist()
        room = self.config.max_pending - self._transport.pending_count
        if room < len(idx):
            shed = idx[max(room, 0) :]
            idx = idx[: max(room, 0)]
            self.metrics.shed.inc(len(shed))
            message = f"{self.config.max_pending} forwarded items already wait for the cloud"
            for i in shed:
                _settle(futures[i], None, OverloadedError(message))
        site, bundle, codec, level = self.site, self.bundle_id, self.codec, self._zstd_level
        feats = [(name, outputs[name]) for name in self._features]
        publish = self._transport.publish
        ids = _uuid4_bytes(len(idx))
        sent = 0
        mids: list[bytes] = []
        for k, i in enumerate(idx):
            mid = ids[k]
            r = None if rel is None else rel[i]
            c = None if conf is None else conf[i]
            meta: dict[str, Any] = {"decision": "forward"}
            if r is not None:
                meta["relevance"] = r
            if c is not None:
                meta["exit_confidence"] = c
            # Whether zstd pays off depends on the feature tensors, which keep their size:
            # try it on every 64th envelope and follow what it showed for the others.
            probe = self._encoded % _COMPRESS_PROBE_EVERY == 0
            self._encoded += 1
            try:
                payload = encode_envelope(
                    Envelope(
                        Kind.FEATURES,
                        mid,
                        site,
                        bundle,
                        {name: arr[i : i + 1] for name, arr in feats},
                        meta,
                        created_us[i],
                        0,
                        codec,
                    ),
                    zstd_level=level,
                    compress=probe or self._compress,
                )
                if probe:
                    self._compress = bool(payload[_FLAGS_OFFSET] & _FLAG_ZSTD)
                publish(mid, payload, (futures[i], arrived[i], r, c))
            except (ValueError, AgentPeerError) as exc:
                error = exc if isinstance(exc, AgentPeerError) else ModelError(str(exc))
                _settle(futures[i], None, error)
                continue
            sent += len(payload)
            mids.append(mid)
        if sent:
            self.metrics.bytes_sent.inc(sent)
        if mids:
            self._deadlines.append((time.monotonic() + self._timeout_s, mids))

    # paho network thread

    def _on_result(self, env: Envelope, waiting: _Waiting) -> None:
        future, arrived, rel, exit_conf = waiting
        meta = env.meta
        mid = env.message_id.hex()
        worker = meta.get("worker")
        worker = worker if isinstance(worker, str) else None
        status = meta.get("status")
        m = self.metrics
        if status == "ok":
            label, confidence, problem = _label_of(env)
            if problem is not None:
                m.rejected.labels(reason="bad_result").inc()
                log.warning("site %s: unusable result for %s: %s", self.site, mid, problem)
                _settle(future, None, CloudFailedError(mid, f"malformed result: {problem}", worker))
                return
            ms = (time.perf_counter() - arrived) * 1000.0
            m.cloud_results.labels(status="ok").inc()
            m.latency.observe("cloud", ms / 1000.0)
            answer = Answer(
                "cloud",
                label,
                confidence,
                rel,
                exit_conf,
                self.thresholds,
                self.bundle_id,
                mid,
                ms,
                worker,
                "ok",
            )
            _settle(future, answer, None)
        elif status == "busy":
            m.cloud_results.labels(status="busy").inc()
            retry = meta.get("retry_after_ms")
            retry_ms = int(retry) if isinstance(retry, int | float) and retry >= 0 else None
            _settle(future, None, CloudBusyError(mid, retry_ms, worker))
        elif status == "error":
            m.cloud_results.labels(status="error").inc()
            reason = meta.get("error")
            _settle(future, None, CloudFailedError(mid, str(reason or "unspecified error"), worker))
        else:
            m.rejected.labels(reason="bad_result").inc()
            log.warning("site %s: result for %s has unknown status %r", self.site, mid, status)
            _settle(
                future, None, CloudFailedError(mid, f"unknown result status {status!r}", worker)
            )

    # deadlines

    def _deadline_loop(self) -> None:
        tick = min(0.05, max(0.001, self._timeout_s / 4))
        take = self._transport.take
        dq = self._deadlines
        timeout_ms = self.config.cloud_timeout_ms
        while not self._halt.wait(tick):
            now = time.monotonic()
            expired = 0
            while dq and dq[0][0] <= now:
                _deadline, mids = dq.popleft()
                for mid in mids:
                    waiting = take(mid)
                    if waiting is not None:
                        expired += 1
                        _settle(waiting[0], None, CloudTimeoutError(mid.hex(), timeout_ms))
            if expired:
                self.metrics.timeouts.inc(expired)
                log.debug("site %s: %d forwarded items timed out", self.site, expired)


def _uuid4_bytes(n: int) -> list[bytes]:
    """``n`` random version-4 UUIDs as bytes, from one call to the OS random source."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    flat = raw.tobytes()
    return [flat[16 * k : 16 * k + 16] for k in range(n)]


def _label_of(env: Envelope) -> tuple[int | None, float | None, str | None]:
    """Label and confidence of an ``ok`` result: from meta, else from its output tensor."""
    meta = env.meta
    label = meta.get("label")
    confidence = meta.get("confidence")
    if label is None and env.tensors:
        probs = np.asarray(next(iter(env.tensors.values())), dtype=np.float32).reshape(-1)
        if probs.size:
            label = int(np.argmax(probs))
            if confidence is None:
                confidence = float(probs[label])
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        return None, None, f"label {label!r} is not a class index"
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, int | float):
            return None, None, f"confidence {confidence!r} is not a number"
        confidence = float(confidence)
    return label, confidence, None
