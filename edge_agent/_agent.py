"""The edge agent: model, decisions, MQTT, and the answers callers wait for.

Three ways in, one way through (:meth:`Agent._process`):

* :meth:`Agent.submit_batch` runs one model call for a whole batch in the caller's thread
  and returns one future per item — the throughput path.
* :meth:`Agent.submit` queues one input; a model thread takes whatever is queued (up to
  ``runtime.max_batch``) and runs it as one batch, so concurrent single requests share
  model calls.
* ``await`` :meth:`Agent.infer` is :meth:`submit` bridged to the caller's event loop.

Dropped and early-exit items are answered before ``_process`` returns. Forwarded items
are committed to the durable outbox (:mod:`._outbox`) before they are published, and stay
there until the cloud's answer has been handed out: the answer resolves the caller's future
(or goes to ``on_answer``) as it arrives, and only when that returns is the outbox row
deleted (the journal thread). A crash in between loses nothing: the restarted agent asks
again, and hands that outcome out marked ``recovered``, as it does for every item it found
in the outbox. A caller waits at most ``cloud_timeout_ms``: then it gets the edge's own answer
(``status="degraded"``) or an error, as ``breaker.offline`` says, and the item becomes
*detached*: it is re-sent with backoff until answered or evicted, and its final outcome
goes to the ``on_answer`` callback. Items recovered from the outbox at start-up are
detached from the start. Each forwarded item thus gets one final outcome in each run.

Threads: the model thread (single submits), paho's network thread (results, handed out
as they arrive), the journal thread (outbox inserts and deletes in one transaction, then
publishing), the resend thread (backoff, expiry, gauges) and the deadline thread (callers
who waited long enough).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import math
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

from fogline.compression import (
    Codec,
    Envelope,
    Kind,
    MetaError,
    ResultMeta,
    ResultStatus,
    encode_envelope,
    is_compressed,
    mark_resent,
    now_us,
)
from fogline.edge_agent._breaker import STATE_CODES, CircuitBreaker
from fogline.edge_agent._config import AgentConfig
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent._outbox import Eviction, Outbox, OutboxFullError, OutboxLimits
from fogline.edge_agent._pipeline import BatchDecision, Decision, decide_batch
from fogline.edge_agent._runtime import EdgeRuntime, InputSpec
from fogline.edge_agent._transport import Transport
from fogline.edge_agent.errors import (
    AgentError,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    CloudUnavailableError,
    ModelError,
    NotRunningError,
    OutboxError,
    OutboxEvictedError,
    OverloadedError,
)
from fogline.sync import Bundle, BundleError, Thresholds

__all__ = ["Agent", "Answer", "Delivery", "Source"]

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
    agent to its answer. ``status`` is ``ok``, or ``degraded`` for a forwarded item the
    edge answered alone because the cloud did not answer in time (the cloud's answer
    follows through ``on_answer``). ``tag`` is the caller's own correlation string.
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
    tag: str | None = None

    @property
    def decision(self) -> str:
        """The edge decision: ``drop``, ``exit`` or ``forward``."""
        return "forward" if self.status == "degraded" else _DECISION_OF[self.source]

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
            "tag": self.tag,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """The final outcome of a forwarded item no caller waits for any more (it timed out,
    was answered degraded, or was recovered from the outbox after a restart): the cloud's
    :class:`Answer`, or the error that ended it (:class:`CloudFailedError`,
    :class:`OutboxEvictedError`). One per item in each run of the agent.

    ``recovered`` marks an item found in the outbox at start-up. Its outcome may have
    been handed out already, just before the agent was killed (the outbox row is deleted
    only after the answer's callbacks returned), so an application that must see each
    item once checks these against what it kept, by ``tag`` or ``message_id``."""

    message_id: str
    tag: str | None
    answer: Answer | None
    error: AgentError | None
    recovered: bool = False


class _Pending:
    """A forwarded item in the outbox, waiting for its answer. Mutated under the agent's
    pending lock only."""

    __slots__ = (
        "arrived",
        "attempts",
        "busy",
        "conf",
        "future",
        "label",
        "next_at",
        "recovered",
        "rel",
        "tag",
    )

    def __init__(
        self,
        future: Future[Answer] | None,
        arrived: float,
        rel: float | None,
        conf: float | None,
        label: int | None,
        tag: str | None,
        next_at: float,
    ) -> None:
        self.future = future
        self.arrived = arrived
        self.rel = rel
        self.conf = conf
        self.label = label
        self.tag = tag
        self.next_at = next_at
        self.attempts = 1
        self.busy = False
        self.recovered = False  # found in the outbox at start-up


@dataclass(slots=True)
class _Outgoing:
    """The forwarded items of one model batch, on their way to the journal thread:
    outbox entries and, for each, its caller and its pending record."""

    done: threading.Event | None  # set once stored and published (submit_batch waits)
    entries: list[tuple[bytes, bytes, int, str | None]] = field(default_factory=list)
    waiters: list[tuple[Future[Answer], _Pending]] = field(default_factory=list)


_STOP = object()
_COMMIT_ATTEMPTS = 4
_T = TypeVar("_T")
_JITTER = 0.2
_GAUGE_EVERY_S = 0.5
_EXPIRE_EVERY_S = 1.0
_COMPRESS_PROBE_EVERY = 64
# While new items come in transactions less than _BUSY_GAP_S apart on average, the
# deletes of answered items (their answers are out already) wait up to _DELETE_WAIT_S for
# the next insert's transaction instead of an fsync of their own. At lower rates the fsync
# is cheaper than the wait, and they commit at once.
_BUSY_GAP_S = 0.002
_DELETE_WAIT_S = 0.004
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

    def __init__(
        self,
        config: AgentConfig,
        *,
        registry: CollectorRegistry | None = None,
        on_answer: Callable[[Delivery], None] | None = None,
    ) -> None:
        if not isinstance(config, AgentConfig):
            raise TypeError("Agent needs an AgentConfig")
        self.config = config
        try:
            self.bundle = Bundle.load(config.bundle_path())
        except BundleError as exc:
            raise ModelError(f"bundle at {config.bundle_dir} is unusable: {exc}") from exc
        self.thresholds: Thresholds = config.thresholds or self.bundle.thresholds
        try:
            self.codec: Codec = config.codec or Codec.parse(self.bundle.codec)
        except ValueError as exc:
            raise ModelError(f"bundle {self.bundle.id}: {exc}") from exc
        self.site = config.site
        self.bundle_id = self.bundle.id
        self.on_answer = on_answer
        self.metrics = AgentMetrics(registry)
        self.metrics.info.info(
            {"site": self.site, "bundle": self.bundle_id, "codec": self.codec.name.lower()}
        )
        self._transport = Transport(
            config.mqtt_settings(), self.site, self._on_result, self.metrics
        )
        self.metrics.pending.set_function(lambda: len(self._pending))
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self.metrics.circuit_state.set_function(lambda: STATE_CODES[self._breaker.state])
        self._runtime: EdgeRuntime | None = None
        self._outbox: Outbox | None = None
        b = config.breaker
        self._breaker = CircuitBreaker(
            failure_threshold=b.failure_threshold,
            open_s=b.open_ms / 1000.0,
            max_open_s=b.max_open_ms / 1000.0,
        )
        self._degrade = b.offline == "degrade"
        self._timeout_s = config.cloud_timeout_ms / 1000.0
        ob = config.outbox
        self._retry_initial_s = ob.retry_initial_ms / 1000.0
        self._retry_max_s = ob.retry_max_ms / 1000.0
        self._resend_rate = float(ob.resend_rate_per_s)
        self._zstd_level = self.bundle.zstd_level
        self._features = tuple(self.bundle.edge.feature_outputs)
        self._compress = True
        self._encoded = 0
        self._state: Literal["new", "running", "stopped"] = "new"
        self._accepting = False
        self._active = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.runtime.max_queue)
        # Forwarded items by message id; guarded by _plock.
        self._pending: dict[bytes, _Pending] = {}
        self._plock = threading.Lock()
        self._resend_heap: list[tuple[float, int, bytes]] = []
        self._resend_seq = 0
        # New items to store and the ids of answered items to delete, for the journal thread.
        self._journal: queue.SimpleQueue[_Outgoing | bytes | None] = queue.SimpleQueue()
        # Items handed to the journal: new ones not yet pending, answered ones not yet
        # deleted; under _plock.
        self._journaling = 0
        # (deadline, message ids) of callers waiting for the cloud. Tuples of atoms, which
        # the garbage collector stops tracking: at cloud_timeout_ms of traffic they are
        # many, and every full collection would walk them all.
        self._deadlines: collections.deque[tuple[float, tuple[bytes, ...]]] = collections.deque()
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
        self._open_outbox()
        loops = {
            "model": self._model_loop,
            "deadlines": self._deadline_loop,
            "journal": self._journal_loop,
            "resend": self._resend_loop,
        }
        self._threads = [
            threading.Thread(target=fn, name=f"fogline-agent-{self.site}-{name}", daemon=True)
            for name, fn in loops.items()
        ]
        for thread in self._threads:
            thread.start()
        with self._cond:
            if self._state != "running":
                raise NotRunningError(f"agent for {self.site} was stopped while starting")
            self._accepting = True
        self._transport.start(wait=wait_connected)

    def _open_outbox(self) -> None:
        ob = self.config.outbox
        path = self.config.outbox_path
        try:
            outbox = Outbox(
                path,
                OutboxLimits(ob.max_items, ob.max_bytes, ob.max_age_s),
                synchronous="full" if ob.synchronous == "full" else "normal",
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox {path}: {exc}") from exc
        self._outbox = outbox
        recovered = outbox.items()
        if recovered:
            now_m, now_w, now_p = time.monotonic(), time.time(), time.perf_counter()
            with self._plock:
                for k, item in enumerate(recovered):
                    # Spread the first re-sends over the drain rate, oldest first.
                    due = now_m + k / self._resend_rate
                    p = _Pending(
                        None,
                        now_p - max(0.0, now_w - item.created_s),
                        None,
                        None,
                        None,
                        item.tag,
                        due,
                    )
                    # Sent by an earlier run (most likely): the next send is a re-send.
                    p.recovered = True
                    self._pending[item.message_id] = p
                    self._schedule(item.message_id, due)
            log.info(
                "site %s: %d unanswered items recovered from the outbox %s",
                self.site,
                len(recovered),
                path,
            )
        self._update_gauges()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new inputs, finish the batches in progress, fail what waits, disconnect.

        Forwarded items not yet answered stay in the outbox for the next start."""
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
            # The model thread first: what it forwards still goes through the journal.
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout_s)
            self._threads[0].join(timeout_s)
            self._journal.put(None)
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
        with self._plock:
            waiting = [p.future for p in self._pending.values() if p.future is not None]
            for p in self._pending.values():
                p.future = None
        for fut in waiting:
            _settle(fut, None, NotRunningError(message + "; the item stays in the outbox"))
        self._transport.stop()
        if self._outbox is not None:
            self._outbox.close()
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
            "duplicates_suppressed": int(v("fogline_agent_duplicates_suppressed_total")),
            "shed": int(v("fogline_agent_shed_total")),
            "pending": len(self._pending),
            "outbox_items": 0 if self._outbox is None else len(self._outbox),
            "resends": int(v("fogline_agent_resends_total")),
            "evicted": int(m.total("fogline_agent_outbox_evictions_total")),
            "degraded": int(v("fogline_agent_degraded_answers_total")),
        }

    @property
    def circuit_state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (see :mod:`._breaker`)."""
        return self._breaker.state

    def drained(self) -> bool:
        """True when no forwarded item is waiting for the cloud (the outbox is empty)."""
        with self._plock:
            return not self._pending and not self._journaling

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the broker acknowledged every feature envelope published so far."""
        return self._transport.flush(timeout_s)

    # ways in

    def submit(self, sample: Any, *, tag: str | None = None, priority: int = 0) -> Future[Answer]:
        """Queue one input (an array of the model's item shape); a future of its answer.

        ``tag`` is the caller's correlation string (kept in the outbox, returned with the
        answer and with any later :class:`Delivery`); ``priority`` orders outbox eviction
        (lowest first). Raises :class:`InputError` at once for an input that does not fit
        the model, and :class:`OverloadedError` when ``runtime.max_queue`` inputs wait.
        """
        t0, created_us = time.perf_counter(), now_us()
        rt = self._require_running()
        arr = rt.input.item(sample)
        _check_tag(tag)
        future: Future[Answer] = Future()
        with self._cond:
            if not self._accepting:
                raise NotRunningError(f"agent for {self.site} is not running")
            try:
                self._queue.put_nowait((arr, future, t0, created_us, tag, int(priority)))
            except queue.Full:
                self.metrics.shed.inc()
                raise OverloadedError(
                    f"{self.config.runtime.max_queue} inputs already wait for the model"
                ) from None
        return future

    async def infer(self, sample: Any, *, tag: str | None = None, priority: int = 0) -> Answer:
        """Answer one input, awaiting it on the caller's event loop.

        Cloud answers arrive on the journal thread and are handed to this loop with
        ``call_soon_threadsafe`` (via :func:`asyncio.wrap_future`). Raises the agent's
        errors: :class:`InputError`, :class:`CloudTimeoutError`, :class:`CloudBusyError`,
        :class:`CloudUnavailableError` (with ``breaker.offline = "fail"``), …
        """
        return await asyncio.wrap_future(self.submit(sample, tag=tag, priority=priority))

    def submit_batch(
        self,
        samples: Any,
        *,
        tags: Sequence[str | None] | None = None,
        priority: int = 0,
    ) -> list[Future[Answer]]:
        """Run a batch (first axis = items) through one model call; one future per item.

        Dropped and early-exit items are resolved when this returns; forwarded items are
        stored in the outbox and published before it returns, and resolve when the cloud
        answers. ``tags`` gives one correlation string per item.
        """
        t0, created_us = time.perf_counter(), now_us()
        rt = self._require_running()
        frames = rt.input.batch(samples)
        n = int(frames.shape[0])
        if tags is not None:
            if len(tags) != n:
                raise ValueError(f"{len(tags)} tags for {n} samples")
            for tag in tags:
                _check_tag(tag)
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
            self._process(
                frames,
                futures,
                arrived,
                created,
                [None] * n if tags is None else list(tags),
                [int(priority)] * n,
                uniform=True,
            )
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
                    [it[4] for it in items],
                    [it[5] for it in items],
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
        tags: Sequence[str | None],
        priorities: Sequence[int],
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
            self._answer_locally(decided, futures, arrived, tags, rel, conf, uniform=uniform)
        if n_fwd:
            self._forward(
                decided,
                outputs=outputs,
                futures=futures,
                arrived=arrived,
                created_us=created_us,
                tags=tags,
                priorities=priorities,
                rel=rel,
                conf=conf,
                wait=uniform,
            )

    def _answer_locally(
        self,
        decided: BatchDecision,
        futures: Sequence[Future[Answer]],
        arrived: Sequence[float],
        tags: Sequence[str | None],
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
            # Metrics first: a caller woken by its answer may read them at once.
            if not per_item:
                latency.observe(source, batch_ms / 1000.0, len(idx))
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
                    tag=tags[i],
                )
                if per_item:
                    latency.observe(source, ms / 1000.0)
                _settle(futures[i], answer, None)

    def _forward(
        self,
        decided: BatchDecision,
        *,
        outputs: dict[str, np.ndarray],
        futures: Sequence[Future[Answer]],
        arrived: Sequence[float],
        created_us: Sequence[int],
        tags: Sequence[str | None],
        priorities: Sequence[int],
        rel: list[float] | None,
        conf: list[float] | None,
        wait: bool,
    ) -> None:
        """Encode the forwarded items of a batch and hand them to the journal thread,
        which stores them durably, then registers and publishes them (:meth:`_release`).
        With ``wait``, return only once that is done."""
        idx = decided.indices(Decision.FORWARD).tolist()
        outbox = self._outbox
        if outbox is None:
            raise NotRunningError(f"agent for {self.site} is not running")
        max_bytes = outbox.limits.max_bytes
        site, bundle, codec, level = self.site, self.bundle_id, self.codec, self._zstd_level
        feats = [(name, outputs[name]) for name in self._features]
        labels = None if decided.labels is None else decided.labels.tolist()
        ids = _uuid4_bytes(len(idx))
        out = _Outgoing(threading.Event() if wait else None)
        for k, i in enumerate(idx):
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
                        ids[k],
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
            except ValueError as exc:
                _settle(futures[i], None, ModelError(str(exc)))
                continue
            if probe:
                self._compress = is_compressed(payload)
            if len(payload) > max_bytes:
                _settle(
                    futures[i],
                    None,
                    OutboxError(
                        f"the outbox refused an envelope of {len(payload)} bytes: its bound is "
                        f"{max_bytes} bytes"
                    ),
                )
                continue
            out.entries.append((ids[k], payload, priorities[i], tags[i]))
            out.waiters.append(
                (
                    futures[i],
                    _Pending(
                        None,
                        arrived[i],
                        r,
                        c,
                        None if labels is None else labels[i],
                        tags[i],
                        0.0,
                    ),
                )
            )
        if not out.entries:
            return
        with self._plock:
            self._journaling += len(out.entries)
        self._journal.put(out)
        if out.done is not None:
            out.done.wait()

    # journal thread: one transaction for the new items and the answered ones

    def _journal_loop(self) -> None:
        journal = self._journal
        last_insert = float("-inf")
        gap = math.inf  # mean time between insert transactions (moving average)
        while True:
            first = journal.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while len(ops) < 4096:
                try:
                    more = journal.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                ops.append(more)
            outgoing = [op for op in ops if isinstance(op, _Outgoing)]
            answered = [op for op in ops if isinstance(op, bytes)]
            if (
                not outgoing
                and not stop
                and gap < _BUSY_GAP_S
                and time.monotonic() - last_insert < _DELETE_WAIT_S
            ):
                stop = self._await_insert(outgoing, answered)
            if outgoing:
                now = time.monotonic()
                since = min(now - last_insert, 1.0)
                gap = since if math.isinf(gap) else 0.8 * gap + 0.2 * since
                last_insert = now
            try:
                evicted, stored = self._commit(outgoing, answered)
                self._release(outgoing, evicted, stored)
            except Exception as exc:  # a fault here must not stop every later delivery
                log.exception("site %s: the outbox journal failed", self.site)
                self._abandon(outgoing, OutboxError(f"the outbox journal failed: {exc}"))
            finally:
                with self._plock:
                    self._journaling -= sum(len(out.entries) for out in outgoing) + len(answered)
                for out in outgoing:
                    if out.done is not None:
                        out.done.set()
            if stop:
                return

    def _await_insert(self, outgoing: list[_Outgoing], answered: list[bytes]) -> bool:
        """Only deletes are waiting while new items keep coming: wait a little for the next
        new items, so that both share one transaction and one fsync. A delete-only commit
        would cost an fsync of its own, and new items arriving during it would queue
        behind it. Fills ``outgoing`` and ``answered``; returns whether the stop marker
        came."""
        journal = self._journal
        deadline = time.monotonic() + _DELETE_WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                op = journal.get(timeout=remaining)
            except queue.Empty:
                return False
            if op is None:
                return True
            if isinstance(op, _Outgoing):
                outgoing.append(op)
                return False
            answered.append(op)

    def _abandon(self, outgoing: list[_Outgoing], error: OutboxError) -> None:
        """End new items with ``error`` after a fault, and take them out of the outbox and
        the pending set, so that ``error`` stays their only outcome."""
        mids = [entry[0] for out in outgoing for entry in out.entries]
        with self._plock:
            for mid in mids:
                self._pending.pop(mid, None)
        outbox = self._outbox
        if outbox is not None:
            try:
                outbox.remove_many(mids)
            except (sqlite3.Error, OSError):
                log.exception("site %s: cannot take abandoned items out of the outbox", self.site)
        for out in outgoing:
            for fut, _p in out.waiters:
                _settle(fut, None, error)

    def _commit(
        self, outgoing: list[_Outgoing], answered: list[bytes]
    ) -> tuple[list[Eviction], bool]:
        """Store the new entries and delete the answered items in one transaction. Returns
        the evictions and whether the new entries were stored.

        When that transaction fails, each part is retried on its own, so a write the file
        refuses cannot hold back new items: if the deletes keep failing (logged), the
        answered items stay in the file and a restart hands them out again, marked
        ``recovered``; if the inserts keep failing their callers get :class:`OutboxError`
        and nothing of them is published."""
        outbox = self._outbox
        if outbox is None:
            return [], False
        add = [entry for out in outgoing for entry in out.entries]
        remove = answered
        try:
            return outbox.commit(add, remove)[0], True
        except (sqlite3.Error, OSError, OutboxFullError) as exc:
            log.warning("site %s: outbox transaction failed (%s); retrying", self.site, exc)
        if remove:
            self._retry("delete answered items", lambda: outbox.remove_many(remove))
        if not add:
            return [], True
        evicted, error = self._retry("store new items", lambda: outbox.add_many(add))
        if error is None:
            return evicted or [], True
        refused = OutboxError(f"the outbox refused {len(add)} items: {error}")
        for out in outgoing:
            for fut, _p in out.waiters:
                _settle(fut, None, refused)
        return [], False

    def _retry(self, what: str, fn: Callable[[], _T]) -> tuple[_T | None, BaseException | None]:
        """``fn()`` with a few attempts and backoff; its result, or the last error."""
        error: BaseException | None = None
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                return fn(), None
            except (sqlite3.Error, OSError, OutboxFullError) as exc:
                error = exc
                log.exception("site %s: outbox: cannot %s (attempt %d)", self.site, what, attempt)
                if isinstance(exc, OutboxFullError) or attempt == _COMMIT_ATTEMPTS:
                    break
                time.sleep(0.05 * attempt)
        return None, error

    def _release(self, outgoing: list[_Outgoing], evicted: list[Eviction], stored: bool) -> None:
        """Register the stored items as pending, then publish them: nothing leaves the
        site before it is on disk."""
        if not stored:
            return
        now_m = time.monotonic()
        connected = self._transport.connected
        first_retry = now_m + self._retry_initial_s * random.uniform(1 - _JITTER, 1 + _JITTER)
        breaker = self._breaker
        gone = {e.item.message_id for e in evicted}
        send: list[bytes] = []
        waiting: list[bytes] = []
        unserved: list[tuple[Future[Answer], _Pending, bytes]] = []
        with self._plock:
            for out in outgoing:
                for (mid, payload, _prio, _tag), (fut, p) in zip(
                    out.entries, out.waiters, strict=True
                ):
                    # An item evicted as it was stored keeps its caller, who learns of it
                    # from _evicted below.
                    doomed = mid in gone
                    wait = (
                        not doomed
                        and connected
                        and (breaker.state == "closed" or breaker.allow_wait(now_m))
                    )
                    p.future = fut if wait or doomed else None
                    p.next_at = first_retry if connected else now_m
                    if not connected:
                        p.attempts = 0  # its first send waits for the connection
                    self._pending[mid] = p
                    self._schedule(mid, p.next_at)
                    if wait:
                        waiting.append(mid)
                    elif not doomed:
                        unserved.append((fut, p, mid))
                    if connected and not doomed:
                        send.append(payload)
        if evicted:
            self._evicted(evicted)
        sent = self._transport.publish_many(send) if send else 0
        if sent:
            self.metrics.bytes_sent.inc(sent)
        why = "not connected to the broker" if not connected else "circuit breaker open"
        for fut, p, mid in unserved:
            self._answer_unserved(fut, p, mid, CloudUnavailableError(mid.hex(), why))
        if waiting:
            self._deadlines.append((now_m + self._timeout_s, tuple(waiting)))

    def _answer_unserved(
        self, future: Future[Answer], p: _Pending, mid: bytes, error: AgentError
    ) -> None:
        """A caller stops waiting for the cloud: the edge's own answer, or ``error``."""
        if self._degrade and p.label is not None:
            ms = (time.perf_counter() - p.arrived) * 1000.0
            answer = Answer(
                "edge",
                p.label,
                p.conf,
                p.rel,
                p.conf,
                self.thresholds,
                self.bundle_id,
                mid.hex(),
                ms,
                None,
                "degraded",
                p.tag,
            )
            self.metrics.degraded.inc()
            self.metrics.latency.observe("edge", ms / 1000.0)
            _settle(future, answer, None)
        else:
            _settle(future, None, error)

    def _evicted(self, evictions: Sequence[Eviction]) -> None:
        """Count, log and end the items an outbox bound pushed out."""
        by_reason: dict[str, int] = {}
        ended: list[tuple[bytes, _Pending]] = []
        with self._plock:
            for ev in evictions:
                mid = ev.item.message_id
                by_reason[ev.reason] = by_reason.get(ev.reason, 0) + 1
                p = self._pending.pop(mid, None)
                if p is not None:
                    ended.append((mid, p))
        for reason, n in by_reason.items():
            self.metrics.evictions.labels(reason=reason).inc(n)
            log.warning(
                "site %s: evicted %d unanswered items from the outbox (bound %s reached)",
                self.site,
                n,
                reason,
            )
        reasons = {ev.item.message_id: ev.reason for ev in evictions}
        for mid, p in ended:
            with self._plock:
                fut, p.future = p.future, None
            self._finish(mid, p, fut, OutboxEvictedError(mid.hex(), reasons[mid]))

    def _schedule(self, mid: bytes, at: float) -> None:
        """Queue a (re-)send of ``mid`` at monotonic time ``at`` (``_plock`` held)."""
        self._resend_seq += 1
        heapq.heappush(self._resend_heap, (at, self._resend_seq, mid))

    def _finish(
        self, mid: bytes, p: _Pending, future: Future[Answer] | None, outcome: Answer | AgentError
    ) -> None:
        """Hand an item's final outcome to its caller, or to ``on_answer`` if none waits."""
        answer = outcome if isinstance(outcome, Answer) else None
        error = outcome if isinstance(outcome, AgentError) else None
        if future is not None:
            _settle(future, answer, error)
            return
        self.metrics.detached.labels(kind="answer" if answer is not None else "error").inc()
        callback = self.on_answer
        if callback is None:
            return
        try:
            callback(Delivery(mid.hex(), p.tag, answer, error, p.recovered))
        except Exception:
            log.exception("site %s: on_answer failed for %s", self.site, mid.hex())

    # paho network thread

    def _on_result(self, env: Envelope) -> None:
        mid = env.message_id
        with self._plock:
            p = self._pending.get(mid)
        if p is None:
            self.metrics.duplicates.inc()
            log.debug("site %s: result for %s matches nothing pending", self.site, mid.hex())
            return
        m = self.metrics
        self._breaker.record_success()
        outcome: Answer | AgentError
        hexid = mid.hex()
        try:
            meta = _result_meta(env)
        except MetaError as exc:
            raw = env.meta.get("worker")
            worker = raw if isinstance(raw, str) else None
            m.rejected.labels(reason="bad_result").inc()
            log.warning("site %s: unusable result for %s: %s", self.site, hexid, exc.detail)
            outcome = CloudFailedError(hexid, f"malformed result: {exc.detail}", worker)
        else:
            worker = meta.worker
            if meta.status is ResultStatus.BUSY:
                m.cloud_results.labels(status="busy").inc()
                retry = meta.retry_after_ms
                retry_s = retry / 1000.0 if retry else self._retry_initial_s
                at = time.monotonic() + retry_s * random.uniform(1, 1 + 2 * _JITTER)
                with self._plock:
                    if self._pending.get(mid) is p:
                        p.busy = True
                        p.next_at = at
                        self._schedule(mid, at)
                return
            if meta.status is ResultStatus.OK:
                ms = (time.perf_counter() - p.arrived) * 1000.0
                m.cloud_results.labels(status="ok").inc()
                m.latency.observe("cloud", ms / 1000.0)
                outcome = Answer(
                    "cloud",
                    meta.label,
                    meta.confidence,
                    p.rel,
                    p.conf,
                    self.thresholds,
                    self.bundle_id,
                    hexid,
                    ms,
                    worker,
                    "ok",
                    p.tag,
                )
            else:
                m.cloud_results.labels(status="error").inc()
                outcome = CloudFailedError(hexid, meta.error or "unspecified error", worker)
        with self._plock:
            if self._pending.pop(mid, None) is not p:
                m.duplicates.inc()
                return
            fut, p.future = p.future, None
            self._journaling += 1  # drained() waits for the delete
        # Handed out first, deleted after: a crash in between costs a second outcome after
        # the restart (marked recovered), never a lost one. Deleting first would turn the
        # same moment into a lost answer: the restarted agent would not ask again.
        try:
            self._finish(mid, p, fut, outcome)
        finally:
            self._journal.put(mid)

    # resend thread: backoff, bounds by age, gauges

    def _resend_loop(self) -> None:
        tick = 0.02
        budget = 0.0
        last = time.monotonic()
        next_gauges = next_expiry = last
        while not self._halt.wait(tick):
            now = time.monotonic()
            budget = min(budget + (now - last) * self._resend_rate, max(1.0, self._resend_rate / 5))
            last = now
            if now >= next_expiry and self._outbox is not None:
                next_expiry = now + _EXPIRE_EVERY_S
                try:
                    expired = self._outbox.expire()
                except sqlite3.Error:
                    log.exception("site %s: outbox expiry failed", self.site)
                    expired = []
                if expired:
                    self._evicted(expired)
            if self._transport.connected and budget >= 1.0:
                budget -= self._resend_due(now, int(budget))
            if now >= next_gauges:
                next_gauges = now + _GAUGE_EVERY_S
                self._update_gauges()

    def _resend_due(self, now: float, limit: int) -> int:
        """Publish up to ``limit`` items whose retry time has come; returns how many."""
        outbox = self._outbox
        if outbox is None:
            return 0
        due: list[tuple[bytes, bool]] = []
        with self._plock:
            heap = self._resend_heap
            while heap and heap[0][0] <= now and len(due) < limit:
                at, _seq, mid = heapq.heappop(heap)
                p = self._pending.get(mid)
                if p is None or p.next_at != at:
                    continue  # answered, evicted or rescheduled meanwhile
                again = p.attempts > 0
                p.attempts += 1
                backoff = min(
                    self._retry_initial_s * 2 ** max(0, p.attempts - 1), self._retry_max_s
                )
                p.next_at = now + backoff * random.uniform(1 - _JITTER, 1 + _JITTER)
                self._schedule(mid, p.next_at)
                due.append((mid, again))
        payloads: list[bytes] = []
        for mid, again in due:
            try:
                payload = outbox.payload(mid)
            except sqlite3.Error:
                log.exception("site %s: outbox read failed", self.site)
                continue
            if payload is None:
                continue
            if again:  # tell the cloud to look for an answer it may already have
                self.metrics.resends.inc()
                payload = mark_resent(payload)
            payloads.append(payload)
        sent_bytes = self._transport.publish_many(payloads) if payloads else 0
        if sent_bytes:
            self.metrics.bytes_sent.inc(sent_bytes)
        return len(due)

    def _update_gauges(self) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        m = self.metrics
        m.outbox_items.set(len(outbox))
        m.outbox_bytes.set(outbox.total_bytes)
        oldest = outbox.oldest_created_s()
        m.outbox_oldest_age.set(0.0 if oldest is None else max(0.0, time.time() - oldest))

    # deadlines

    def _deadline_loop(self) -> None:
        tick = min(0.05, max(0.001, self._timeout_s / 4))
        dq = self._deadlines
        timeout_ms = self.config.cloud_timeout_ms
        while not self._halt.wait(tick):
            now = time.monotonic()
            expired: list[tuple[Future[Answer], _Pending, bytes]] = []
            while dq and dq[0][0] <= now:
                _deadline, mids = dq.popleft()
                with self._plock:
                    for mid in mids:
                        p = self._pending.get(mid)
                        if p is not None and p.future is not None:
                            expired.append((p.future, p, mid))
                            p.future = None
            if not expired:
                continue
            self.metrics.timeouts.inc(len(expired))
            for fut, p, mid in expired:
                self._breaker.record_timeout(now)
                error: AgentError = (
                    CloudBusyError(mid.hex(), None, None)
                    if p.busy
                    else CloudTimeoutError(mid.hex(), timeout_ms)
                )
                self._answer_unserved(fut, p, mid, error)
            log.debug("site %s: %d forwarded items timed out", self.site, len(expired))


def _check_tag(tag: str | None) -> None:
    if tag is not None and (not isinstance(tag, str) or len(tag) > 1024):
        raise ValueError("tag must be a string of at most 1024 characters")


def _uuid4_bytes(n: int) -> list[bytes]:
    """``n`` random version-4 UUIDs as bytes, from one call to the OS random source."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    flat = raw.tobytes()
    return [flat[16 * k : 16 * k + 16] for k in range(n)]


def _result_meta(env: Envelope) -> ResultMeta:
    """The typed meta of a RESULT; an ``ok`` one without a label or confidence in its meta
    takes them from its output tensor (argmax and its probability)."""
    meta = env.meta
    if meta.get("status") == "ok" and env.tensors:
        label, confidence = meta.get("label"), meta.get("confidence")
        if label is None or confidence is None:
            probs = np.asarray(next(iter(env.tensors.values())), dtype=np.float32).reshape(-1)
            if label is None and probs.size:
                label = int(np.argmax(probs))
            if confidence is None and isinstance(label, int) and 0 <= label < probs.size:
                confidence = float(probs[label])
            meta = {**meta, "label": label, "confidence": confidence}
    return ResultMeta.from_meta(meta)
