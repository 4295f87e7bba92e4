"""The edge agent: lifecycle, the ways in, and the wiring of its parts.

Three ways in, one way through (:meth:`Agent._process`):

* :meth:`Agent.submit_batch` runs one model call for a whole batch in the caller's thread
  and returns one future per item — the throughput path.
* :meth:`Agent.submit` queues one input; a model thread takes whatever is queued (up to
  ``runtime.max_batch``) and runs it as one batch, so concurrent single requests share
  model calls.
* ``await`` :meth:`Agent.infer` is :meth:`submit` bridged to the caller's event loop.

Dropped and early-exit items are answered before ``_process`` returns. Forwarded items
are encoded (:class:`~fogline.compression.FeatureMeta` for their meta), handed to the
journal (:mod:`._journal`), which commits them to the durable outbox before the delivery
core (:mod:`._delivery`) admits them and they are published. They stay in the outbox until
the cloud's answer has been handed out: the answer resolves the caller's future (or goes
to ``on_answer``) as it arrives, and only when that returns is the outbox row deleted (by
the journal). A crash in between loses nothing: the restarted agent asks again, and hands
that outcome out marked ``recovered``, as it does for every item it found in the outbox. A
caller waits at most ``cloud_timeout_ms``: then it gets the edge's own answer
(``status="degraded"``) or an error, as ``breaker.offline`` says, and the item becomes
*detached*: it is re-sent with backoff until answered or evicted, and its final outcome
goes to the ``on_answer`` callback. Each forwarded item thus gets one final outcome in
each run.

What is pending, when to re-send, how long a caller waits and what it gets then are all
decided by :class:`~._delivery.DeliveryCore`, which takes the time as an argument; the
delivery threads are thin loops over it in :class:`~._courier.Courier`: paho's network
thread (results, handed out as they arrive), the journal thread (outbox inserts and
deletes in one transaction, then publishing), the resend thread (what is due, expiry,
gauges) and the deadline thread (callers who waited long enough). This module keeps the
lifecycle, the ways in, the model thread (single submits) and the wiring.
The bundle in use is one :class:`~._loaded.LoadedBundle` in ``Agent._loaded``; with a
``[sync]`` config an :class:`~._updater.Updater` thread replaces it (:meth:`Agent.swap_bundle`)
with the bundle the site's signed sync installs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry

from fogline.compression import Codec, now_us
from fogline.edge_agent._answer import Answer, Delivery, Source, answer_locally, settle
from fogline.edge_agent._breaker import STATE_CODES, CircuitBreaker
from fogline.edge_agent._config import AgentConfig
from fogline.edge_agent._courier import Courier, Item, PendingItem
from fogline.edge_agent._delivery import DeliveryCore, DeliveryPolicy, Pending
from fogline.edge_agent._features import FeatureEncoder, uuid4_bytes
from fogline.edge_agent._health import HealthWindow
from fogline.edge_agent._installed import InstalledBundle, choose_bundle
from fogline.edge_agent._journal import Outgoing
from fogline.edge_agent._loaded import LoadedBundle
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent._outbox import Eviction, OutboxLimits
from fogline.edge_agent._pipeline import BatchDecision, Decision, decide_batch
from fogline.edge_agent._runtime import EdgeRuntime, InputSpec
from fogline.edge_agent.errors import (
    AgentError,
    ModelError,
    NotRunningError,
    OutboxError,
    OverloadedError,
)
from fogline.messaging import Supervisor, ThreadFailure
from fogline.sync import Bundle, Thresholds

if TYPE_CHECKING:
    from fogline.edge_agent._updater import Updater

__all__ = ["Agent", "Answer", "Delivery", "Source"]

log = logging.getLogger("fogline.edge_agent")

_STOP = object()
# Batches held for the journal beyond which those it answered itself are forgotten.
_IN_JOURNAL_PRUNE = 4096


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
        on_failure: Callable[[ThreadFailure], None] | None = None,
    ) -> None:
        if not isinstance(config, AgentConfig):
            raise TypeError("Agent needs an AgentConfig")
        self.config = config
        # With sync, the bundle the site installed (checked against its recorded hashes,
        # falling back to the previous one), else the configured one until the first.
        self.installed_bundle: InstalledBundle | None = None
        if config.sync is not None:
            self.installed_bundle = choose_bundle(config.sync.state_dir)
        path = config.bundle_path() if self.installed_bundle is None else self.installed_bundle.path
        # The one replaceable bundle value: read once per batch, swapped in one place.
        self._loaded = LoadedBundle.load(path, thresholds=config.thresholds, codec=config.codec)
        # The bundle a swap replaced, kept while its in-flight items may still be answered.
        self._replaced: LoadedBundle | None = None
        self._updater: Updater | None = None
        self.site = config.site
        self.on_answer = on_answer
        self.on_failure = on_failure
        self.metrics = AgentMetrics(registry)
        self.health = HealthWindow(time.monotonic(), self._failures_total)
        self.metrics.latency.tap = self.health.observe
        self.metrics.info.info(
            {"site": self.site, "bundle": self.bundle_id, "codec": self.codec.name.lower()}
        )
        b, ob = config.breaker, config.outbox
        delivery: DeliveryCore[Future[Answer]] = DeliveryCore(
            DeliveryPolicy(
                timeout_s=config.cloud_timeout_ms / 1000.0,
                retry_initial_s=ob.retry_initial_ms / 1000.0,
                retry_max_s=ob.retry_max_ms / 1000.0,
                resend_rate_per_s=float(ob.resend_rate_per_s),
                degrade=b.offline == "degrade",
            ),
            CircuitBreaker(
                failure_threshold=b.failure_threshold,
                open_s=b.open_ms / 1000.0,
                max_open_s=b.max_open_ms / 1000.0,
            ),
        )
        self._delivery = delivery
        self._halt = threading.Event()
        self._courier = Courier(
            site=self.site,
            settings=config.mqtt_settings(),
            delivery=delivery,
            metrics=self.metrics,
            timeout_ms=config.cloud_timeout_ms,
            loaded=self._loaded_for,
            on_answer=lambda: self.on_answer,
            halt=self._halt,
            health=self.health,
        )
        self._transport = self._courier.transport
        # Every long-lived thread runs under this supervisor (see _start for each kind's
        # policy); the MQTT connection supervises its own network thread and handlers and
        # keeps the counts, which the supervisor reports with its own.
        supervisor = self.supervisor = Supervisor(f"agent for {self.site}", log)
        connection = self._transport.connection
        supervisor.watch("mqtt", lambda: connection.loop_restarts)
        supervisor.watch("mqtt_handler", lambda: connection.handler_errors)
        supervisor.on_fatal(self._failed)
        self._transport.supervisor = supervisor
        self.metrics.thread_failures.add(supervisor.counts)
        # Forwarded items handed to the journal thread and not yet released by it: a
        # journal that dies takes them with it, and their callers must still be answered.
        self._in_journal: dict[int, Outgoing[Item]] = {}
        self._prune_at = _IN_JOURNAL_PRUNE
        self._jlock = threading.Lock()
        self.metrics.pending.set_function(lambda: len(delivery))
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self.metrics.circuit_state.set_function(lambda: STATE_CODES[delivery.breaker.state])
        self._encoder = FeatureEncoder()
        self._state: Literal["new", "running", "stopped"] = "new"
        self._accepting = False
        self._active = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.runtime.max_queue)
        self._threads: list[threading.Thread] = []

    # the bundle in use

    @property
    def bundle(self) -> Bundle:
        return self._loaded.bundle

    @property
    def bundle_id(self) -> str:
        return self._loaded.id

    @property
    def thresholds(self) -> Thresholds:
        return self._loaded.thresholds

    @property
    def codec(self) -> Codec:
        return self._loaded.codec

    @property
    def _runtime(self) -> EdgeRuntime | None:
        return self._loaded.runtime

    def _loaded_for(self, bundle_id: str | None) -> LoadedBundle:
        """The loaded bundle of ``bundle_id`` while the agent holds it, else the one in use."""
        loaded = self._loaded
        replaced = self._replaced
        if bundle_id is not None and replaced is not None and replaced.id == bundle_id:
            return replaced
        return loaded

    def _failures_total(self) -> float:
        """Inputs that ended in an error so far (for the health of status reports)."""
        m = self.metrics
        return (
            m.value("fogline_agent_cloud_results_total", {"status": "error"})
            + m.value("fogline_agent_cloud_timeouts_total")
            + m.value("fogline_agent_shed_total")
            + self.supervisor.counts().get("model", 0)
        )

    # hot swap

    def stage_bundle(self, path: Path) -> LoadedBundle:
        """Load the bundle at ``path`` with its edge model and warm it up (a few dummy
        batches), without touching the one in use. :class:`ModelError` when it cannot
        run here, or takes another input than the running one (queued inputs were
        checked against that)."""
        loaded = LoadedBundle.load(path, thresholds=self.config.thresholds, codec=self.config.codec)
        rt = self.config.runtime
        runtime = EdgeRuntime(
            loaded.bundle,
            threads=rt.threads,
            max_batch=rt.max_batch,
            warmup_runs=max(1, rt.warmup_runs),
        )
        current = self._runtime
        if current is not None and runtime.input != current.input:
            raise ModelError(
                f"bundle {loaded.id} takes input {runtime.input.describe()}; the running "
                f"{self.bundle_id} takes {current.input.describe()}: a site's bundles keep "
                "their input"
            )
        runtime.warm_up()
        return loaded.with_runtime(runtime)

    def swap_bundle(self, loaded: LoadedBundle) -> LoadedBundle:
        """Run ``loaded`` (staged, warm) from the next model batch on; returns the one it
        replaced. A batch already running finishes on the old bundle, and its forwarded
        items are answered under the old bundle's name (the cloud runs the tail their
        envelopes name); nothing waiting is dropped."""
        if not isinstance(loaded, LoadedBundle) or loaded.runtime is None:
            raise TypeError("swap_bundle needs a LoadedBundle from stage_bundle")
        old = self._loaded
        self._replaced = old
        self._loaded = loaded  # the swap: one attribute, read once per batch
        self.metrics.info.info(
            {"site": self.site, "bundle": loaded.id, "codec": loaded.codec.name.lower()}
        )
        log.info("site %s: now running bundle %s (was %s)", self.site, loaded.id, old.id)
        return old

    @property
    def updater(self) -> Updater | None:
        """The bundle updater (with a ``[sync]`` config, once started), else None."""
        return self._updater

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
        self._loaded = self._loaded.with_runtime(runtime)
        ob = self.config.outbox
        courier = self._courier
        journal = courier.open(
            self.config.outbox_path,
            OutboxLimits(ob.max_items, ob.max_bytes, ob.max_age_s),
            synchronous=ob.synchronous,
            # Looked up at each call, so that a test may replace the method.
            release=lambda out, ev, stored: self._release(out, ev, stored),  # noqa: PLW0108
        )
        # What each thread kind does when something escapes it (docs/agent.md, "Thread
        # supervision"): the model and resend loops lose at most one iteration's work,
        # whose callers are answered (model) or whose items are re-sent at their next
        # backoff (resend), so they carry on. An escape from the journal leaves the items
        # it was committing neither known stored nor known refused, and one from the
        # deadline loop leaves callers taken off their items but never answered: the agent
        # cannot be trusted after either, so it reports not ready for good.
        loops: dict[str, tuple[Callable[[], None], bool]] = {
            "model": (self._model_loop, False),
            "deadlines": (courier.deadline_loop, True),
            "journal": (journal.run, True),
            "resend": (courier.resend_loop, False),
        }
        self._threads = [
            self.supervisor.thread(
                kind,
                fn,
                fatal=fatal,
                name=f"fogline-agent-{self.site}-{kind}",
                halt=self._halt,
            )
            for kind, (fn, fatal) in loops.items()
        ]
        for thread in self._threads:
            thread.start()
        with self._cond:
            if self._state != "running":
                raise NotRunningError(f"agent for {self.site} was stopped while starting")
            self._accepting = True
        sync = self.config.sync
        if sync is not None:
            from fogline.edge_agent._updater import Updater

            updater = self._updater = Updater.for_agent(self, sync)
            self._transport.watch_sync(updater.nudge)
        self._transport.start(wait=wait_connected)
        if self._updater is not None:
            self._updater.start(self.supervisor)

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
        if self._updater is not None:
            self._updater.stop(timeout_s)
        self._halt.set()
        journal = self._courier.journal
        if self._threads:
            # The model thread first: what it forwards still goes through the journal.
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout_s)
            self._threads[0].join(timeout_s)
            if journal is not None:
                journal.stop()
        for thread in self._threads:
            thread.join(timeout_s)
        message = f"agent for {self.site} stopped before answering"
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                settle(item[1], None, NotRunningError(message))
        self._courier.close(message + "; the item stays in the outbox")
        log.info("agent for site %s stopped", self.site)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # state

    @property
    def ready(self) -> bool:
        """True when the model is warm, the broker connected, inputs are accepted and no
        thread has failed for good (:attr:`failed`)."""
        rt = self._runtime
        return (
            self._accepting
            and rt is not None
            and rt.ready
            and self._transport.connected
            and self.supervisor.failed is None
        )

    @property
    def failed(self) -> ThreadFailure | None:
        """Why the agent stopped serving for good (a thread whose state cannot be trusted
        after a failure; see :meth:`_start`), or None. Once set, :attr:`ready` stays false,
        new inputs are refused, and the agent should be stopped and started afresh:
        ``fogline agent run`` exits 70. ``on_failure`` is called with it when it happens."""
        return self.supervisor.failed

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
        journal = self._courier.journal
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
            "pending": len(self._delivery),
            "outbox_items": 0 if journal is None else len(journal),
            "resends": int(v("fogline_agent_resends_total")),
            "evicted": int(m.total("fogline_agent_outbox_evictions_total")),
            "degraded": int(v("fogline_agent_degraded_answers_total")),
        }

    @property
    def circuit_state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (see :mod:`._breaker`)."""
        return self._delivery.breaker.state

    def drained(self) -> bool:
        """True when no forwarded item is waiting for the cloud (the outbox is empty)."""
        return self._delivery.drained()

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
        _check_priority(priority)
        future: Future[Answer] = Future()
        with self._cond:
            if not self._accepting:
                raise self._not_running()
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
        _check_priority(priority)
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
                raise self._not_running()
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
            raise self._not_running()
        return rt

    def _not_running(self) -> NotRunningError:
        failure = self.supervisor.failed
        if failure is not None:
            return NotRunningError(f"agent for {self.site} stopped serving: {failure}")
        return NotRunningError(f"agent for {self.site} is not running")

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
            futures = [it[1] for it in items]
            try:
                self._process(
                    np.stack([it[0] for it in items]),
                    futures,
                    [it[2] for it in items],
                    [it[3] for it in items],
                    [it[4] for it in items],
                    [it[5] for it in items],
                    uniform=False,
                )
            except Exception as exc:  # noqa: BLE001 - the model thread's supervisor, per batch
                self._batch_failed(items, exc)
            if stop:
                return

    def _batch_failed(self, items: list[Any], exc: Exception) -> None:
        """A batch of the model thread failed: its callers get the error, the failure is
        logged with the batch's tags and counted, and the thread goes on with the next."""
        tags = [it[4] for it in items if it[4] is not None]
        what = f"a batch of {len(items)} inputs" + (
            f" (tags {', '.join(repr(t) for t in tags[:8])}{', …' if len(tags) > 8 else ''})"
            if tags
            else ""
        )
        self.supervisor.contained("model", what, exc)
        error = exc if isinstance(exc, AgentError) else AgentError(f"the agent failed on {what}")
        for it in items:
            settle(it[1], None, error)

    def _failed(self, failure: ThreadFailure) -> None:
        """A thread failed for good (on that thread): refuse new inputs, answer every
        caller who waits with the failure, then tell ``on_failure``."""
        with self._cond:
            self._accepting = False
        error = self._not_running()
        for fut in self._delivery.take_waiters():
            settle(fut, None, error)
        with self._jlock:
            held = list(self._in_journal.values())
            self._in_journal.clear()
        for out in held:
            for _p, fut in out.items:
                settle(fut, None, error)
            if out.done is not None:
                out.done.set()  # submit_batch callers waiting for a journal that is gone
        callback = self.on_failure
        if callback is not None:
            callback(failure)

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
        loaded = self._loaded  # one bundle for the whole batch, even across a swap
        rt = loaded.runtime
        if rt is None:
            raise NotRunningError(f"agent for {self.site} is not running")
        n = len(futures)
        try:
            outputs = rt.run(frames)
            decided = decide_batch(
                outputs,
                thresholds=loaded.thresholds,
                filter_output=loaded.filter_output,
                exit_output=loaded.exit_output,
                batch_size=n,
            )
        except (AgentError, ValueError) as exc:
            error = exc if isinstance(exc, AgentError) else ModelError(str(exc))
            for fut in futures:
                settle(fut, None, error)
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
            answer_locally(
                loaded,
                decided,
                futures,
                arrived,
                tags,
                rel,
                conf,
                uniform=uniform,
                latency=m.latency,
            )
        if n_fwd:
            self._forward(
                loaded,
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

    def _forward(
        self,
        loaded: LoadedBundle,
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
        journal = self._courier.journal
        if journal is None:
            raise NotRunningError(f"agent for {self.site} is not running")
        max_bytes = journal.limits.max_bytes
        site, encoder = self.site, self._encoder
        feats = [(name, outputs[name]) for name in loaded.feature_outputs]
        labels = None if decided.labels is None else decided.labels.tolist()
        ids = uuid4_bytes(len(idx))
        out: Outgoing[Item] = Outgoing(threading.Event() if wait else None)
        for k, i in enumerate(idx):
            r = None if rel is None else rel[i]
            c = None if conf is None else conf[i]
            try:
                payload = encoder.encode(
                    loaded,
                    site,
                    ids[k],
                    {name: arr[i : i + 1] for name, arr in feats},
                    r,
                    c,
                    created_us[i],
                )
            except ValueError as exc:
                settle(futures[i], None, ModelError(str(exc)))
                continue
            if len(payload) > max_bytes:
                settle(
                    futures[i],
                    None,
                    OutboxError(
                        f"the outbox refused an envelope of {len(payload)} bytes: its bound is "
                        f"{max_bytes} bytes"
                    ),
                )
                continue
            out.entries.append((ids[k], payload, priorities[i], tags[i]))
            p: PendingItem = Pending(
                None,
                arrived[i],
                r,
                c,
                None if labels is None else labels[i],
                tags[i],
                bundle=loaded.id,
            )
            out.items.append((p, futures[i]))
        if not out.entries:
            return
        if self.supervisor.failed is not None:
            error = self._not_running()
            for _p, fut in out.items:
                settle(fut, None, error)
            return
        with self._jlock:
            self._in_journal[id(out)] = out
            if len(self._in_journal) > self._prune_at:
                # Items the journal refused are answered by it but never released here.
                for key, held in list(self._in_journal.items()):
                    if all(fut.done() for _p, fut in held.items):
                        del self._in_journal[key]
                # A journal far behind keeps many: scan again only once they have doubled.
                self._prune_at = max(_IN_JOURNAL_PRUNE, 2 * len(self._in_journal))
        try:
            self._courier.send(out)
        finally:
            if out.done is not None:  # waited for: the journal is done with it (or gone)
                with self._jlock:
                    self._in_journal.pop(id(out), None)

    def _release(
        self, outgoing: list[Outgoing[Item]], evicted: list[Eviction], stored: bool
    ) -> None:
        """The journal's hook after each commit (:meth:`Courier.release`)."""
        with self._jlock:
            for out in outgoing:
                if out.done is None:  # one waited for leaves once the journal sets done
                    self._in_journal.pop(id(out), None)
        self._courier.release(outgoing, evicted, stored)


def _check_tag(tag: str | None) -> None:
    if tag is not None and (not isinstance(tag, str) or len(tag) > 1024):
        raise ValueError("tag must be a string of at most 1024 characters")


# Priorities are stored as SQLite integers in the outbox; a 32-bit range gives every
# ordering a caller needs and keeps a value like 2**63 from reaching the journal.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


def _check_priority(priority: int) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an integer, got {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, got {priority}"
        )
    return priority
