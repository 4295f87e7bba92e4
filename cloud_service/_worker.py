"""The cloud worker: features in over MQTT, each run through the model repository's
``stream`` lane by the cloud part of the bundle it names, results out.

The worker is a thin adapter over :class:`~fogline.cloud_service._repository.ModelRepository`,
the one data plane, as the inference API is (threads in brackets)::

    broker ─► on_message [paho network thread]: decode, check, deduplicate, submit each
              │                                  item to its bundle's stream lane (or answer
              │                                  at once: unknown bundle → error, lane full →
              │                                  busy)
              ▼
            ModelRepository [one scheduler thread per model version]: batch, run the
              │             backend, hand the batch's answers to the worker's callback,
              │             which publishes one RESULT per item to its site
              ▼
            _StoreWriter [store thread]: write the results in one transaction, then
                                          acknowledge their MQTT messages

Each of these threads is supervised (docs/cloud.md, "Thread supervision"): a message or a
batch whose handling fails is answered, logged and counted, and its thread carries on; an
escape from the store writer or from a scheduler's own loop leaves work in a state that
cannot be trusted, so the worker reports not ready for good (:attr:`CloudWorker.failed`)
and ``fogline cloud serve`` exits 70. A store that completes no write for
``store.stall_after_s`` while results wait makes the worker not ready until it writes
again.

Results are published before they are stored, so a database round trip never sits on
the answer's path; the store catches up within a batch or two.

Delivery: MQTT acknowledgements are manual. A message is acknowledged only once its
result is stored (or once it is answered for good without a result: rejected, refused
as busy, failed), so the broker never counts a message as delivered while its result
could still be lost with this process. Processing is idempotent by (site, message id): a
re-sent item is answered from this worker's recent results, from another item in flight,
or from the store, and is neither run nor stored twice. End to end, the agent's outbox
re-sends what the cloud never answered; with Mosquitto's clean sessions that is what
recovers messages in flight to a worker that died (see docs/cloud.md).

Bundles: every ready bundle version in the repository is served, several versions of one
bundle side by side; a version loaded into the repository at run time
(:meth:`~fogline.cloud_service._repository.ModelRepository.load_bundle`) is answered from
its first message on, and one unloaded is answered "unknown bundle" once its queued items
are done.

Bundles on demand (``bundle_source``, ``wanted``): a message naming a version that is not
loaded but that the source can provide is answered busy while one load of it runs in the
background, on the worker's ``bundles`` thread (supervised, carries on), and is served by
that version once loaded; a version the source never released is answered "unknown
bundle", and that answer is remembered for a while so a flood of such messages does not
reach the catalogue. The same thread reconciles every ``reconcile_s``: it loads what is
wanted and not loaded, and unloads what is neither wanted nor static and has been idle for
the grace period (:class:`~fogline.cloud_service._bundle_loads.LoadPolicy`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt.client import MQTTMessageInfo

from fogline.cloud_service._backends import Backend, BackendChoice
from fogline.cloud_service._bundle_loads import (
    DEFAULT_GRACE_S,
    DEFAULT_RETRY_S,
    LoadPlan,
    LoadPolicy,
)
from fogline.cloud_service._bundle_source import BundleSource, Wanted
from fogline.cloud_service._config import CloudConfig
from fogline.cloud_service._metrics import CloudMetrics
from fogline.cloud_service._repository import (
    NUMPY_DTYPES,
    Completed,
    ModelRepository,
    bundle_model_config,
)
from fogline.cloud_service._serving import Lane
from fogline.cloud_service._store import ResultStore, StoredResult
from fogline.cloud_service.errors import (
    BrokerError,
    BundleNotReleasedError,
    CloudError,
    ConfigError,
    DeadlineExceededError,
    ModelNotReadyError,
    QueueFullError,
    StoreError,
    UnknownBundleError,
    UnknownModelError,
)
from fogline.compression import (
    Codec,
    Envelope,
    Kind,
    ResultMeta,
    ResultStatus,
    decode_message,
    encode_envelope,
    join_envelopes,
    now_us,
)
from fogline.messaging import Inbound, MqttConnection, MqttError, Supervisor, ThreadFailure
from fogline.sync import Bundle, BundleError

__all__ = ["CloudWorker"]

log = logging.getLogger("fogline.cloud")

#: Loads a bundle's cloud part into a backend (replaces the configured backend).
BackendLoader = Callable[[Bundle], Backend]


_Key = tuple[str, bytes]
_RECENT_RESULTS = 50_000
# Bundles on demand: how long "never released" is remembered, how many ids are remembered
# so, and how many loads may wait (more are answered busy without being queued).
_UNKNOWN_TTL_S = 30.0
_UNKNOWN_MAX = 4096
_MAX_REQUESTED = 64


class _Delivery:
    """One MQTT message and how many of its envelopes are still being handled: a message
    can carry several items (:func:`~fogline.compression.join_envelopes`), and the broker
    gets its PUBACK only when the last of them is finished with."""

    __slots__ = ("inbound", "left")

    def __init__(self, inbound: Inbound, left: int) -> None:
        self.inbound = inbound
        self.left = left


@dataclass(frozen=True)
class _Served:
    """A bundle version the repository serves, as the worker feeds it."""

    bundle: Bundle
    inputs: tuple[str, ...]
    dtypes: tuple[np.dtype[Any], ...]
    output: str


@dataclass(frozen=True)
class _Item:
    env: Envelope
    received_us: int
    served: _Served
    delivery: _Delivery | None = None
    # Copies of this item that arrived while it was queued or running.
    twins: list[_Delivery] = field(default_factory=list)

    @property
    def key(self) -> _Key:
        return (self.env.site, self.env.message_id)

    @property
    def maybe_answered(self) -> bool:
        """Only a re-sent item (the agent's resent flag, or the broker's redelivery flag)
        can have an earlier result in the store: fresh items skip the query."""
        return self.env.resent or (self.delivery is not None and self.delivery.inbound.dup)


# A result this worker published, kept to answer re-sends of the same item: label,
# confidence, output row, output name. A plain tuple of atoms, which the garbage collector
# stops tracking: tens of thousands of tracked objects here made every full collection
# stop the worker for 10-20 ms.
_Recent = tuple[int, float, np.ndarray, str]


class _StoreWriter:
    """Writes results on its own thread, gathering them for up to ``linger_s`` so a busy
    worker makes a few large transactions per second instead of one per batch; then
    acknowledges the MQTT messages whose results the transaction stored.

    A failing store is retried with backoff until it works or the worker stops: the
    messages stay unacknowledged meanwhile, which also stops the broker from sending this
    worker more than its in-flight window. Each write transaction's time is observed
    (``fogline_cloud_store_write_seconds``), and the store counts as *stalled* while
    results wait and no write has completed for ``stall_after_s`` (a lock held on the
    table, a database that hangs): :meth:`stalled_s` says so, for readiness and metrics.

    The thread runs under ``supervisor`` (kind ``store``, fatal): what escapes a write is
    not a store error (those are retried) but a fault after which the transaction's rows
    and acknowledgements are in no known state."""

    def __init__(
        self,
        store: ResultStore,
        metrics: CloudMetrics,
        ack: Callable[[list[_Delivery]], None],
        supervisor: Supervisor,
        *,
        stall_after_s: float = 10.0,
        linger_s: float = 0.05,
        max_rows: int = 5000,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._ack = ack
        self._stall_after_s = stall_after_s
        self._linger_s = linger_s
        self._max_rows = max_rows
        self._lock = threading.Lock()
        # Two conditions on one lock: the writer waits for work, flush() for its end.
        self._work = threading.Condition(self._lock)
        self._written = threading.Condition(self._lock)
        self._rows: list[StoredResult] = []
        self._acks: list[_Delivery] = []
        self._pending = 0
        # When the store last made progress: the last completed write, or the moment
        # results began to wait after none did. Stalled = results wait and this is old.
        self._progress_at = time.monotonic()
        self._stall_reported = False
        # The writer's state, which decides whether a put must wake it: only when it
        # waits for a first write, or lingers and max_rows has come. A wake-up of another
        # thread costs the waker tens of microseconds on a virtual machine; waking the
        # writer for every batch while it lingers anyway was a tenth of a busy worker's
        # time in Python.
        self._idle = False
        self._lingering = False
        self._closing = False
        self._stopping = threading.Event()
        self._thread = supervisor.thread("store", self._run, fatal=True, name="fogline-store")
        metrics.store_waiting.set_function(lambda: float(self._pending))
        metrics.store_stalled.set_function(lambda: 0.0 if self.stalled_s() is None else 1.0)

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Results handed over and not yet written."""
        return self._pending

    def stalled_s(self) -> float | None:
        """How long results have waited without a write completing, once that is at least
        ``stall_after_s``; None while the store keeps up."""
        with self._lock:
            if self._pending == 0:
                return None
            waited = time.monotonic() - self._progress_at
            if waited < self._stall_after_s:
                return None
            first = not self._stall_reported
            self._stall_reported = True
            waiting = self._pending
        if first:
            log.warning(
                "the result store %s has completed no write for %.0f s while %d results "
                "wait; not ready until it writes again",
                self._store.url,
                waited,
                waiting,
            )
        return waited

    def put(self, rows: list[StoredResult], acks: list[_Delivery]) -> None:
        with self._lock:
            if self._pending == 0:
                self._progress_at = time.monotonic()
            self._rows.extend(rows)
            self._acks.extend(acks)
            self._pending += len(rows)
            if self._idle or (self._lingering and len(self._rows) >= self._max_rows):
                self._work.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything handed over so far is written (or failed)."""
        with self._lock:
            return self._written.wait_for(lambda: self._pending == 0, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what was handed over, then end the thread (the store is retried until
        ``timeout_s``; after that its results stay unwritten and unacknowledged)."""
        with self._lock:
            self._closing = True
            self._work.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _take(self) -> tuple[list[StoredResult], list[_Delivery]] | None:
        """The next transaction's rows and acknowledgements: waits for a first result,
        then up to ``linger_s`` for more; None once stopped with nothing left."""
        with self._lock:
            while not self._rows:
                if self._closing:
                    return None
                self._idle = True
                self._work.wait()
                self._idle = False
            deadline = time.monotonic() + self._linger_s
            self._lingering = True
            while len(self._rows) < self._max_rows and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._work.wait(remaining)
            self._lingering = False
            rows, acks = self._rows, self._acks
            self._rows, self._acks = [], []
            return rows, acks

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            rows, acks = taken
            try:
                self._write(rows, acks)
            except BaseException as exc:
                # Named for the supervisor's log line: which results were being written.
                keys = ", ".join(f"{r.site}/{r.message_id}" for r in rows[:3])
                more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
                exc.add_note(f"while writing {len(rows)} results ({keys}{more})")
                raise

    def _write(self, rows: list[StoredResult], acks: list[_Delivery]) -> None:
        attempt = 0
        observe = self._metrics.store_write_seconds.observe
        while True:
            began = time.perf_counter()
            try:
                self._store.put_many(rows)
                observe(time.perf_counter() - began)
                break
            except StoreError as exc:
                observe(time.perf_counter() - began)
                self._metrics.store_errors.inc()
                attempt += 1
                if self._stopping.is_set():
                    log.error(  # noqa: TRY400 - the error is the message; no traceback
                        "stopping with %d results the store refused (%s); their messages stay "
                        "unacknowledged",
                        len(rows),
                        exc,
                    )
                    acks = []
                    break
                log.warning("the store refused %d results (%s); retrying", len(rows), exc)
                self._stopping.wait(min(0.1 * 2**attempt, 5.0))
        if acks:
            self._ack(acks)
        with self._lock:
            self._pending -= len(rows)
            now = time.monotonic()
            stalled_for = now - self._progress_at
            self._progress_at = now
            reported, self._stall_reported = self._stall_reported, False
            self._written.notify_all()
        if reported:
            log.warning(
                "the result store %s wrote again after %.1f s without a completed write",
                self._store.url,
                stalled_for,
            )


class _RateLimitedLog:
    """Logs a recurring problem at most once per interval per reason, with a count."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, reason: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(reason, (-math.inf, 0))
            if now - last < self._interval_s:
                self._last[reason] = (last, suppressed + 1)
                return
            self._last[reason] = (now, 0)
        extra = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning("%s%s", message, extra)


class CloudWorker:
    """Serves the cloud parts of bundles from MQTT, through a model repository.

    ``start()`` opens the store and subscribes; ``stop()`` answers what is queued and shuts
    down. Several workers may share the load through the MQTT shared subscription named by
    ``config.share_group``.

    ``repository`` lets a caller share a started :class:`ModelRepository` (with the inference
    API): the worker then serves every bundle version it holds, including those loaded at
    run time, and neither starts nor stops it. Without one, the worker builds its own from
    ``config`` (the bundles, the backend and its settings, ``[batching]`` as the bundles'
    batching) and loads and warms it in ``start()``. ``store`` lets a caller share a
    :class:`ResultStore` (the worker then does not close it); ``backend_loader`` replaces
    the configured backend of the worker's own repository, e.g. to wrap or instrument it.

    ``bundle_source`` (e.g. a :class:`~fogline.cloud_service._bundle_source.CatalogueSource`)
    lets the worker load, on demand, bundle versions it was not given; ``wanted`` (a
    callable returning bundle ids, e.g. ``union_wanted(director_wanted(home),
    fleet_wanted(store))``) says which versions sites run, to load them before their first
    message and to unload the others after ``unload_grace_s`` idle. The bundles served at
    start are never unloaded. Reconciles run every ``reconcile_s`` (and at once after
    start); :meth:`reconcile_bundles` runs one now.
    """

    def __init__(
        self,
        config: CloudConfig,
        *,
        repository: ModelRepository | None = None,
        store: ResultStore | None = None,
        backend_loader: BackendLoader | None = None,
        metrics: CloudMetrics | None = None,
        on_failure: Callable[[ThreadFailure], None] | None = None,
        bundle_source: BundleSource | None = None,
        wanted: Wanted | None = None,
        reconcile_s: float = 30.0,
        unload_grace_s: float = DEFAULT_GRACE_S,
        load_retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        if repository is not None and backend_loader is not None:
            raise ValueError("give a repository or a backend_loader, not both")
        if not reconcile_s > 0 or math.isinf(reconcile_s):
            raise ValueError(f"reconcile_s must be a positive number of seconds, not {reconcile_s}")
        # Checked now, used from start (the static bundles are known then).
        LoadPolicy(grace_s=unload_grace_s, retry_s=load_retry_s)
        self.config = config
        self.worker_id = config.worker_id
        self.topics = config.topics
        self.metrics = metrics if metrics is not None else CloudMetrics()
        self._repository = repository
        self._owns_repository = repository is None
        self._store = store
        self._owns_store = store is None
        self._backend_loader = backend_loader
        self._by_path: dict[Path, Bundle] = {}
        self._served: dict[str, _Served] = {}
        # Bundles on demand. The condition guards the requests and the remembered answers;
        # the admin lock makes loads and reconciles (and the policy) one at a time.
        self._source = bundle_source
        self._wanted = wanted
        self._reconcile_s = float(reconcile_s)
        self._grace_s = float(unload_grace_s)
        self._retry_s = float(load_retry_s)
        self._policy: LoadPolicy | None = None
        self._last_served: dict[str, float] = {}
        self._bundles_cond = threading.Condition()
        self._bundles_admin = threading.RLock()
        self._requested: dict[str, None] = {}  # ids to load, in arrival order
        self._loading: str | None = None
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> remembered until
        self._load_errors: dict[str, float] = {}  # id -> not retried on demand until
        self._bundles_halt = threading.Event()
        self._bundles_thread: threading.Thread | None = None
        self._writer: _StoreWriter | None = None
        self._mqtt: MqttConnection | None = None
        self._last_publish: MQTTMessageInfo | None = None
        self._reject_log = _RateLimitedLog()
        # Idempotency: results published recently, and items queued or running (whose
        # copies wait for them), both keyed by (site, message id).
        self._dlock = threading.Lock()
        self._drained = threading.Condition(self._dlock)
        self._recent: OrderedDict[_Key, _Recent] = OrderedDict()
        self._in_flight: dict[_Key, _Item] = {}
        self._unacked = 0
        self._lock = threading.Lock()
        self._started = False
        self._running = False
        self._accepting = False
        self._stopped = False
        self._bundles_ready = False
        self.on_failure = on_failure
        # The worker's threads run under this supervisor: the store writer (fatal), and
        # the MQTT connection's network thread and handlers, whose counts it reports. The
        # repository's scheduler threads have the repository's (see start).
        supervisor = self.supervisor = Supervisor(f"cloud worker {self.worker_id}", log)
        supervisor.watch("mqtt", lambda: 0 if self._mqtt is None else self._mqtt.loop_restarts)
        supervisor.watch(
            "mqtt_handler", lambda: 0 if self._mqtt is None else self._mqtt.handler_errors
        )
        supervisor.on_fatal(self._failed)
        self.metrics.thread_failures.add(supervisor.counts)
        self._failure_told = False
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        # Read when scraped rather than set for every message: a gauge's set takes a lock
        # and was several of each item's microseconds on the network thread.
        self.metrics.acks_pending.set_function(lambda: float(max(0, self._unacked)))
        self.metrics.queue_depth.set_function(lambda: float(len(self._in_flight)))
        self._results_by_status = {
            status: self.metrics.results.labels(status.value) for status in ResultStatus
        }

    # lifecycle

    def start(self, *, wait: bool = True) -> CloudWorker:
        """Load and warm the bundles (unless a repository was given), open the store,
        connect and subscribe.

        With ``wait``, return only once subscribed (raising :class:`BrokerError` if the
        broker cannot be reached in ``broker.connect_timeout_s``); without it, the
        connection is made in the background and :attr:`ready` turns true once it is.
        Raises :class:`ConfigError` for unusable bundles, :class:`BackendError` and
        :class:`StoreError` when those cannot start.
        """
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("a CloudWorker can be started once")
            self._started = True
        try:
            # The store first: a store URL that cannot work is a one-line error, said
            # before minutes of loading and warming models, not after.
            if self._store is None:
                self._store = ResultStore(self.config.store.url)
            repository = self._repository
            if repository is None:
                repository = self._repository = self._own_repository()
                repository.start()
            repository.supervisor.on_fatal(self._failed)
            self._policy = LoadPolicy(
                static={b.id for b in repository.bundles()},
                grace_s=self._grace_s,
                retry_s=self._retry_s,
            )
            self._bundles_ready = True
            self._writer = _StoreWriter(
                self._store,
                self.metrics,
                self._ack,
                self.supervisor,
                stall_after_s=self.config.store.stall_after_s,
            )
            self._writer.start()
            with self._lock:  # not when a thread failed for good meanwhile (see _failed)
                self._accepting = self.failed is None
            self._connect(wait)
            if self._source is not None or self._wanted is not None:
                self._bundles_thread = self.supervisor.thread(
                    "bundles",
                    self._run_bundles,
                    fatal=False,
                    name="fogline-bundles",
                    halt=self._bundles_halt,
                )
                self._bundles_thread.start()
        except BaseException:
            self.stop()
            raise
        self._running = True
        choice = repository.backend_choice
        log.info(
            "cloud worker %s serving %s (%s)",
            self.worker_id,
            ", ".join(f"{b} on {name}" for b, name in self._backends().items()) or "no bundle",
            choice.reason if choice else "backend supplied by caller",
        )
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking work, answer and store what is queued, then disconnect. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._accepting = False  # from now on new items are answered "busy"
        mqtt = self._mqtt
        if mqtt is not None and mqtt.is_connected:
            try:
                mqtt.unsubscribe(self._subscription)
            except MqttError as exc:  # the broker went; its session ends with ours
                log.warning("could not unsubscribe while stopping: %s", exc)
        deadline = time.monotonic() + timeout_s
        with self._bundles_cond:
            self._bundles_halt.set()
            self._bundles_cond.notify_all()
        if self._bundles_thread is not None:
            # A load under way finishes first (a repository load cannot be interrupted).
            self._bundles_thread.join(timeout_s)
        repository = self._repository
        if repository is not None and self._owns_repository:
            repository.stop(timeout_s)  # runs what is queued; answers reach the writer
        self._wait_drained(max(0.0, deadline - time.monotonic()))
        # Store what was answered, then acknowledge it, and only then disconnect.
        if self._writer is not None:
            self._writer.stop(timeout_s)
        if mqtt is not None:
            last = self._last_publish
            if last is not None and mqtt.is_connected:
                # Not sent before the connection went: the agent's outbox retries it.
                with contextlib.suppress(RuntimeError, ValueError):
                    last.wait_for_publish(min(timeout_s, 2.0))
            mqtt.stop()
        if self._store is not None and self._owns_store:
            self._store.close()
        if self._running:
            log.info("cloud worker %s stopped", self.worker_id)

    def __enter__(self) -> CloudWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        """Bundles loaded and warmed, connected to the broker, no thread failed for good
        (:attr:`failed`) and the store not stalled."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the worker is not ready (one line), or None when it is."""
        if self._stopped:
            return "stopped"
        failed = self.failed
        if failed is not None:
            return failed.message
        if not self._bundles_ready:
            return "loading bundles" if self._started else "not started"
        if self._mqtt is None or not self._mqtt.is_connected:
            return "not connected to the broker"
        writer = self._writer
        stalled = None if writer is None else writer.stalled_s()
        if stalled is not None:
            assert writer is not None
            return (
                f"result store stalled: no write completed for {stalled:.0f} s while "
                f"{writer.waiting} results wait"
            )
        return None

    @property
    def failed(self) -> ThreadFailure | None:
        """Why the worker stopped serving for good (its store writer, or a scheduler thread
        of its repository, failed in a way that leaves its work in no known state), or
        None. Once set, :attr:`ready` stays false and new items are answered busy; the
        process should be restarted (``fogline cloud serve`` exits 70). ``on_failure`` is
        called with it when it happens."""
        own = self.supervisor.failed
        if own is not None:
            return own
        repository = self._repository
        return None if repository is None else repository.failed

    def _failed(self, failure: ThreadFailure) -> None:
        """A thread of the worker or of its repository failed for good (on that thread):
        stop taking work, then tell ``on_failure`` (once)."""
        with self._lock:
            self._accepting = False
            told, self._failure_told = self._failure_told, True
        callback = self.on_failure
        if not told and callback is not None:
            callback(failure)

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if time.monotonic() >= deadline or self._stopped:
                return False
            time.sleep(0.01)
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every item received so far is answered and stored."""
        deadline = time.monotonic() + timeout_s
        if not self._wait_drained(timeout_s):
            return False
        if self._writer is None:
            return True
        return self._writer.flush(max(0.0, deadline - time.monotonic()))

    @property
    def store(self) -> ResultStore | None:
        """The result store (None before ``start``)."""
        return self._store

    @property
    def mqtt(self) -> MqttConnection | None:
        """The worker's broker connection (None before ``start``), for the few other
        messages the service publishes on it (the sync nudges)."""
        return self._mqtt

    @property
    def repository(self) -> ModelRepository | None:
        """The model repository the worker submits to (None before ``start`` when it
        builds its own)."""
        return self._repository

    @property
    def backend_choice(self) -> BackendChoice | None:
        """The backend the repository loads models into and why (None when a loader
        replaces it, or before ``start``)."""
        return None if self._repository is None else self._repository.backend_choice

    @property
    def bundle_ids(self) -> tuple[str, ...]:
        """The bundle versions served now."""
        if self._repository is None:
            return ()
        return tuple(b.id for b in self._repository.bundles())

    @property
    def queue_depth(self) -> int:
        """Items submitted to the repository and not yet answered."""
        with self._dlock:
            return len(self._in_flight)

    def status(self) -> dict[str, Any]:
        """A JSON-friendly summary for ``/readyz`` and logs."""
        choice = self.backend_choice
        backends = self._backends()
        reason = self.not_ready_reason()
        failed = self.failed
        writer = self._writer
        return {
            "ready": reason is None,
            "reason": reason,
            "failed": None if failed is None else failed.message,
            "store_waiting": 0 if writer is None else writer.waiting,
            "worker": self.worker_id,
            "bundles": list(backends),
            "backends": backends,
            "backend_reason": choice.reason if choice else None,
            "mqtt_connected": bool(self._mqtt and self._mqtt.is_connected),
            "queue_depth": self.queue_depth,
            "unacknowledged": self._unacked,
            "bundles_loading": self.bundles_loading,
        }

    @property
    def bundles_loading(self) -> list[str]:
        """Bundle versions being loaded on demand now or waiting to be."""
        with self._bundles_cond:
            loading = [] if self._loading is None else [self._loading]
            return loading + [b for b in self._requested if b != self._loading]

    # start-up pieces

    def _own_repository(self) -> ModelRepository:
        """The repository over ``config.bundles``, with every backend setting."""
        cfg = self.config
        bundles: list[Bundle] = []
        for root in cfg.bundles:
            try:
                bundles.append(Bundle.load(root))
            except BundleError as exc:
                raise ConfigError(f"bundle {root}: {exc}") from exc
        loader = None
        if self._backend_loader is not None:
            # Bundles loaded on demand are added to this as they come (see _load_now).
            by_path = self._by_path
            by_path.update({b.cloud_model_path: b for b in bundles})
            bundle_loader = self._backend_loader

            def loader(path: Path, max_batch_size: int) -> Backend:
                return bundle_loader(by_path[path])

        return ModelRepository(
            bundles=bundles,
            backend=cfg.backend,
            threads=cfg.threads,
            tensorrt=cfg.tensorrt,
            bundle_config=bundle_model_config(cfg.batching),
            metrics=self.metrics,
            backend_loader=loader,
        )

    def _backends(self) -> dict[str, str]:
        repository = self._repository
        if repository is None:
            return {}
        out: dict[str, str] = {}
        for b in repository.bundles():
            with contextlib.suppress(CloudError):  # unloaded between the two calls
                out[b.id] = repository.backend_name(b.name, b.version) or "unloaded"
        return out

    @property
    def _subscription(self) -> str:
        return self.topics.all_features(self.config.share_group)

    def _connect(self, wait: bool) -> None:
        self._mqtt = MqttConnection(
            self.config.mqtt_settings,
            subscriptions=((self._subscription, 1),),
            on_inbound=self._on_message,
        )
        try:
            self._mqtt.start(wait=wait)
        except MqttError as exc:
            raise BrokerError(str(exc)) from exc

    def _wait_drained(self, timeout_s: float) -> bool:
        with self._drained:
            return self._drained.wait_for(lambda: not self._in_flight, timeout_s)

    # ingest (paho network thread)

    def _on_message(self, topic: str, payload: bytes, inbound: Inbound) -> None:
        # Runs on paho's network thread: an exception here would stop all MQTT traffic.
        with self._dlock:
            self._unacked += 1
        if inbound.dup:
            self.metrics.redeliveries.inc()
        self.metrics.received.inc()
        envelopes, error = decode_message(payload)
        if error is not None:
            self._reject(error.reason, f"rejected a message on {topic}: {error}")
        delivery = _Delivery(inbound, max(1, len(envelopes)))
        if not envelopes:
            self._ack([delivery])
            return
        received_us = now_us()
        items: list[_Item] = []
        for env in envelopes:
            try:
                item = self._ingest(topic, env, received_us, delivery)
            except Exception as exc:  # noqa: BLE001 - the handler's supervisor, per envelope
                # The top of this worker's code on paho's thread (its supervisor): whatever
                # escapes the checks above is a bug; it is logged with the envelope's
                # identity and counted, and the envelope is let go, so the thread serves
                # the next one.
                self.metrics.rejected.labels("internal").inc()
                what = f"envelope {env.message_id.hex()} of site {env.site!r} on {topic}"
                self.supervisor.contained("mqtt_handler", what, exc)
                self._ack([delivery])
                continue
            if item is not None:
                items.append(item)
        if not items:
            return
        try:
            todo = self._answer_from_store(items)
        except Exception as exc:  # noqa: BLE001 - contained: a duplicate run at worst
            self.supervisor.contained(
                "mqtt_handler", f"looking up earlier results for {_ids(items)} on {topic}", exc
            )
            with self._dlock:  # those it answered before it failed are retired already
                todo = [item for item in items if item.key in self._in_flight]
        self._submit(todo)

    def _ingest(
        self, topic: str, env: Envelope, received_us: int, delivery: _Delivery
    ) -> _Item | None:
        """Check one envelope of a message and register it as in flight; the item to run,
        or None when it is finished with (its share of the acknowledgement is given) or a
        copy of an item in flight (which then owns that share)."""
        if env.kind is not Kind.FEATURES:
            self._reject("wrong_kind", f"rejected a {env.kind.name} message on {topic}")
            return self._done(delivery)
        try:
            site = self.topics.site_of(topic)
        except ValueError:
            self._reject("bad_topic", f"rejected a message on unexpected topic {topic}")
            return self._done(delivery)
        if site != env.site:
            self._reject(
                "site_mismatch",
                f"rejected a message for site {env.site!r} published on site {site!r}'s topic",
            )
            return self._done(delivery)
        served = self._served.get(env.bundle) or self._look_up(env.bundle)
        if served is None:
            self._reply(env, self._unserved(env.bundle))
            return self._done(delivery)
        problem = _check_features(env.tensors, served.inputs)
        if problem is not None:
            self._reply(env, ResultMeta.failed(f"bundle {env.bundle}: {problem}"))
            return self._done(delivery)
        key: _Key = (env.site, env.message_id)
        item = _Item(env, received_us, served, delivery)
        with self._dlock:
            recent = self._recent.get(key)
            twin_of = None if recent is not None else self._in_flight.get(key)
            if twin_of is not None:
                twin_of.twins.append(delivery)
            elif recent is None:
                self._in_flight[key] = item
        if recent is not None:
            self.metrics.duplicates.labels("memory").inc()
            label, confidence, output, output_name = recent
            self._reply_with(env, label, confidence, output_name, output)
            return self._done(delivery)
        if twin_of is not None:
            self.metrics.duplicates.labels("in_flight").inc()
            return None
        return item

    def _done(self, delivery: _Delivery) -> _Item | None:
        """Finished with at once: give up the envelope's share of the acknowledgement."""
        self._ack([delivery])
        return None

    def _look_up(self, bundle_id: str) -> _Served | None:
        """The served form of a bundle version the repository has ready (cached: a bundle
        id names one signed content), or None."""
        repository = self._repository
        bundle = None if repository is None else repository.bundle(bundle_id)
        if repository is None or bundle is None:
            return None
        try:
            meta = repository.metadata(bundle.name, bundle.version)
        except CloudError:  # unloaded since
            return None
        served = _Served(
            bundle=bundle,
            inputs=tuple(s.name for s in meta.inputs),
            dtypes=tuple(np.dtype(NUMPY_DTYPES[s.datatype]) for s in meta.inputs),
            output=bundle.cloud.output,
        )
        self._served[bundle_id] = served
        return served

    def _answer_from_store(self, items: list[_Item]) -> list[_Item]:
        """Answer the re-sent items another worker (or an earlier run of this one) already
        stored; the others. A store that cannot be read costs a duplicate run, not an
        answer: the insert ignores a key that is already there. One query per message, on
        paho's thread, and only for re-sent items (rare but for recoveries)."""
        store = self._store
        maybe = [it for it in items if it.maybe_answered]
        if store is None or not maybe:
            return items
        try:
            found = store.get_many([(it.env.site, it.env.message_id) for it in maybe])
        except StoreError as exc:
            log.warning("cannot look up earlier results (%s); running the items", exc)
            return items
        if not found:
            return items
        todo: list[_Item] = []
        for item in items:
            hit = found.get((item.env.site, item.env.message_id.hex()))
            if hit is None:
                todo.append(item)
                continue
            self.metrics.duplicates.labels("store").inc()
            output_name = item.served.output
            output = np.asarray(hit.output, dtype=np.float32).reshape(1, -1)
            self._reply_with(item.env, hit.label, hit.confidence, output_name, output)
            self._ack(self._finish_item(item, (hit.label, hit.confidence, output, output_name)))
        return todo

    def _submit(self, items: Sequence[_Item]) -> None:
        """Hand items to their bundles' stream lanes, those of one message for one bundle
        version together (so they can share a batch); answer at once those refused."""
        repository = self._repository
        busy_ms = self.config.batching.busy_retry_after_ms
        by_bundle: dict[str, list[_Item]] = {}
        for item in items:
            by_bundle.setdefault(item.env.bundle, []).append(item)
        refused: list[tuple[_Item, ResultMeta]] = []
        now = time.monotonic()
        for bundle_id, group in by_bundle.items():
            self._last_served[bundle_id] = now  # for the unload policy's idle time
            if not self._accepting or repository is None:
                refused.extend((item, ResultMeta.busy(busy_ms)) for item in group)
                continue
            served = group[0].served
            try:
                requests = [(_feed(item.env, served), item) for item in group]
                errors = repository.submit_many_async(
                    served.bundle.name,
                    served.bundle.version,
                    requests,
                    on_done=self._on_done,
                    lane=Lane.STREAM,
                )
            except (ModelNotReadyError, UnknownModelError):
                meta = self._not_served(bundle_id)
                refused.extend((item, meta) for item in group)
                continue
            except RuntimeError:  # the version's scheduler stopped between the checks
                refused.extend((item, ResultMeta.busy(busy_ms)) for item in group)
                continue
            except Exception as exc:  # noqa: BLE001 - the handler's supervisor, per message
                # A bug between the checks and the queue: these items are answered with the
                # error and retired, so none stays in flight for ever (its re-sends would
                # wait for it), and the thread serves the next message.
                self.supervisor.contained(
                    "mqtt_handler", f"{_ids(group)} for bundle {bundle_id}", exc
                )
                why = f"inference failed: internal error ({type(exc).__name__})"
                refused.extend((item, ResultMeta.failed(why)) for item in group)
                continue
            for item, error in errors:
                if isinstance(error, QueueFullError):
                    refused.append((item, ResultMeta.busy(error.retry_after_ms)))
                else:
                    refused.append((item, ResultMeta.failed(f"inference failed: {error}")))
        for item, meta in refused:
            self._reply(item.env, meta)
            self._ack(self._finish_item(item, None))

    def _not_served(self, bundle_id: str) -> ResultMeta:
        """The answer for a bundle version that stopped being served under an item: an
        error when it is gone, busy while it is being reloaded."""
        self._served.pop(bundle_id, None)
        repository = self._repository
        if repository is not None and repository.bundle(bundle_id) is not None:
            return ResultMeta.busy(self.config.batching.busy_retry_after_ms)
        return self._unserved(bundle_id)

    # bundles on demand

    def _unserved(self, bundle_id: str) -> ResultMeta:
        """The answer for an item of a bundle version the repository does not serve (on
        paho's thread: no I/O). Without a source: unknown bundle. With one: unknown while a
        recent answer said it was never released, an error while a recent load of it
        failed, else busy, with one load of it asked for."""
        unknown = ResultMeta.failed(str(UnknownBundleError(bundle_id)))
        if self._source is None:
            return unknown
        now = time.monotonic()
        with self._bundles_cond:
            until = self._unknown.get(bundle_id)
            if until is not None:
                if now < until:
                    return unknown
                del self._unknown[bundle_id]
            until = self._load_errors.get(bundle_id)
            if until is not None:
                if now < until:
                    return ResultMeta.failed(
                        f"bundle {bundle_id!r} could not be loaded; the cloud's log says why"
                    )
                del self._load_errors[bundle_id]
            if (
                bundle_id not in self._requested
                and bundle_id != self._loading
                and len(self._requested) < _MAX_REQUESTED
                and not self._bundles_halt.is_set()
            ):
                self._requested[bundle_id] = None
                self._bundles_cond.notify()
        return ResultMeta.busy(self.config.batching.busy_retry_after_ms)

    def _run_bundles(self) -> None:
        """The bundles thread: loads asked for by messages, and a reconcile every
        ``reconcile_s`` (the first at once)."""
        halt = self._bundles_halt
        cond = self._bundles_cond
        due = time.monotonic()
        while not halt.is_set():
            if time.monotonic() >= due:
                self.reconcile_bundles()
                due = time.monotonic() + self._reconcile_s
                continue
            with cond:
                while not self._requested and not halt.is_set():
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                if halt.is_set() or not self._requested:
                    continue
                bundle_id = next(iter(self._requested))
                del self._requested[bundle_id]
                self._loading = bundle_id
            try:
                self._load_now(bundle_id, "a message named it")
            finally:
                with cond:
                    self._loading = None

    def reconcile_bundles(self, now: float | None = None) -> LoadPlan:
        """One reconcile, now: load the wanted versions that are not loaded, unload those
        the policy says (``now``: the monotonic time to judge idleness at; tests step
        it). What ``wanted`` raises skips the round (nothing is unloaded on a view that
        may be partial). Returns the plan carried out."""
        repository = self._repository
        policy = self._policy
        if repository is None or policy is None:
            return LoadPlan()
        with self._bundles_admin:
            when = time.monotonic() if now is None else now
            wanted: set[str] = set()
            if self._wanted is not None:
                try:
                    wanted = set(self._wanted())
                except Exception as exc:  # noqa: BLE001 - a source of any kind; the round is skipped
                    self._reject_log.warning(
                        "wanted", f"cannot tell which bundles are wanted ({exc}); not reconciling"
                    )
                    return LoadPlan()
            loaded = {b.id for b in repository.bundles()}
            # A copy first: paho's thread adds to the dict while this runs.
            last_served = dict(self._last_served)
            for bundle_id in last_served.keys() - loaded:
                self._last_served.pop(bundle_id, None)
            plan = policy.plan(when, wanted=wanted, loaded=loaded, last_served=last_served)
            loads = plan.load if self._source is not None else ()
            for bundle_id in loads:
                if self._bundles_halt.is_set():
                    break
                self._load_now(bundle_id, "a site runs it")
            for bundle_id in plan.unload:
                self._unload_now(bundle_id)
            return LoadPlan(load=tuple(loads), unload=plan.unload)

    def _load_now(self, bundle_id: str, why: str) -> None:
        """Fetch ``bundle_id`` from the source and load it into the repository (on the
        bundles thread, or a caller's for a reconcile); failures are logged and
        remembered, never raised."""
        repository = self._repository
        source = self._source
        policy = self._policy
        if repository is None or source is None or policy is None:
            return
        with self._bundles_admin:
            if repository.bundle(bundle_id) is not None:
                return
            began = time.monotonic()
            try:
                bundle = _fetched(source, bundle_id)
                self._by_path[bundle.cloud_model_path] = bundle
                repository.load_bundle(bundle)
            except BundleNotReleasedError as exc:
                now = time.monotonic()
                policy.failed(bundle_id, now)
                with self._bundles_cond:
                    self._unknown[bundle_id] = now + _UNKNOWN_TTL_S
                    self._unknown.move_to_end(bundle_id)
                    while len(self._unknown) > _UNKNOWN_MAX:
                        self._unknown.popitem(last=False)
                self._reject_log.warning("not_released", f"{exc}; answering unknown bundle")
                return
            except (CloudError, BundleError) as exc:
                now = time.monotonic()
                policy.failed(bundle_id, now)
                with self._bundles_cond:
                    self._load_errors[bundle_id] = now + self._retry_s
                log.error(  # noqa: TRY400 - the error is the message; no traceback
                    "cannot load bundle %s (%s): %s; its items are answered with an error "
                    "for %.0f s",
                    bundle_id,
                    why,
                    exc,
                    self._retry_s,
                )
                return
            except Exception as exc:  # noqa: BLE001 - the bundles thread's supervisor, per load
                now = time.monotonic()
                policy.failed(bundle_id, now)
                with self._bundles_cond:
                    self._load_errors[bundle_id] = now + self._retry_s
                self.supervisor.contained("bundles", f"loading bundle {bundle_id}", exc)
                return
            self._last_served[bundle_id] = time.monotonic()
            with self._bundles_cond:
                self._load_errors.pop(bundle_id, None)
            log.info(
                "loaded bundle %s on demand (%s) in %.1f s",
                bundle_id,
                why,
                time.monotonic() - began,
            )

    def _unload_now(self, bundle_id: str) -> None:
        repository = self._repository
        if repository is None:
            return
        name, _, version = bundle_id.rpartition("@")
        try:
            repository.unload(name, version)
        except CloudError as exc:
            log.warning("cannot unload bundle %s: %s", bundle_id, exc)
            return
        self._served.pop(bundle_id, None)
        self._last_served.pop(bundle_id, None)
        if self._source is not None:
            self._source.forget(bundle_id)
        log.info("unloaded bundle %s: no site runs it and it served nothing lately", bundle_id)

    def _ack(self, deliveries: list[_Delivery]) -> None:
        """Give up one share of each delivery; acknowledge the messages whose last share
        that was (safe from any thread)."""
        if not deliveries:
            return
        done: list[Inbound] = []
        with self._dlock:
            for d in deliveries:
                d.left -= 1
                if d.left == 0:
                    done.append(d.inbound)
            self._unacked -= len(done)
        if not done:
            return
        mqtt = self._mqtt
        if mqtt is None:
            return
        for inbound in done:
            mqtt.ack(inbound)

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self._reject_log.warning(reason, message)

    def _finish_item(self, item: _Item, recent: _Recent | None) -> list[_Delivery]:
        """Retire an answered item: remember its result, release its copies. Returns the
        acknowledgements it owns (its own and its copies')."""
        key = item.key
        with self._dlock:
            self._in_flight.pop(key, None)
            if recent is not None:
                self._recent[key] = recent
                if len(self._recent) > _RECENT_RESULTS:
                    self._recent.popitem(last=False)
            if not self._in_flight:
                self._drained.notify_all()
            return [d for d in (item.delivery, *item.twins) if d is not None]

    # answers (the model version's scheduler thread)

    def _on_done(self, completed: Sequence[Completed]) -> None:
        """One batch's answers for this worker's items: publish them (joined per site),
        retire the items, and hand the results to the store writer."""
        first = completed[0]
        if first.batch_rows:
            self.metrics.batch_size.observe(first.batch_rows)
            self.metrics.compute_seconds.observe(first.compute_s)
        compute_ms = round(first.compute_s * 1000.0, 3)
        retry_ms = self.config.batching.busy_retry_after_ms
        completed_us = now_us()
        outgoing: list[tuple[str, bytes]] = []
        answered: list[tuple[_Item, int, float, np.ndarray, list[float]]] = []
        acks: list[_Delivery] = []
        ok: list[tuple[Completed, _Item, np.ndarray]] = []
        for done in completed:
            item: _Item = done.tag
            self.metrics.queue_seconds.observe(done.queued_s)
            row = _output_row(done, item.served.output, retry_ms)
            if isinstance(row, ResultMeta):
                outgoing.append(self._result(item.env, row))
                acks.extend(self._finish_item(item, None))
            else:
                ok.append((done, item, row))
        for done, item, row in ok:
            # The label in Python over the row's values (needed anyway for the store):
            # np.argmax lets go of the GIL in each call, and a call per item handed it to
            # the network thread and back for every result.
            values = row.tolist()
            total = sum(values)
            if math.isnan(total):  # a NaN among them: np.argmax's answer (the first NaN)
                label = _argmax_like_numpy(values)
            else:
                label = max(range(len(values)), key=values.__getitem__)
            confidence = float(values[label])
            confidence = round(confidence, 6) if math.isfinite(confidence) else 0.0
            queue_ms = round(done.queued_s * 1000.0, 3)
            meta = ResultMeta.ok(label, confidence, queue_ms=queue_ms, compute_ms=compute_ms)
            try:
                outgoing.append(self._result(item.env, meta, {item.served.output: row}))
            except ValueError as exc:
                # An output row the result codec refuses (NaN, ±inf, beyond float16): the
                # item fails out loud rather than travel as a wrong "ok".
                log.warning("inference failed for one item of %s: %s", item.env.bundle, exc)
                outgoing.append(
                    self._result(item.env, ResultMeta.failed(f"inference failed: {exc}"))
                )
                acks.extend(self._finish_item(item, None))
                continue
            answered.append((item, label, confidence, row, values))
        # Encode first, then publish: the results for one site travel joined in one message.
        self._publish(outgoing)
        stored: list[StoredResult] = []
        for item, label, confidence, row, values in answered:
            env = item.env
            recent = (label, confidence, row.copy(), item.served.output)
            acks.extend(self._finish_item(item, recent))
            stored.append(
                StoredResult(
                    site=env.site,
                    message_id=env.message_id.hex(),
                    bundle=env.bundle,
                    label=label,
                    confidence=confidence,
                    output=tuple(values),
                    worker=self.worker_id,
                    created_us=env.created_us,
                    received_us=item.received_us,
                    completed_us=completed_us,
                )
            )
        if self._writer is not None and stored:
            self._writer.put(stored, acks)
        else:
            self._ack(acks)

    # replies

    def _result(
        self,
        request: Envelope,
        meta: ResultMeta,
        tensors: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[str, bytes]:
        """The topic and encoded RESULT envelope answering ``request``; the meta's
        ``worker`` is this worker's id."""
        wire = meta.to_meta()
        wire["worker"] = self.worker_id
        result = Envelope(
            kind=Kind.RESULT,
            message_id=request.message_id,
            site=request.site,
            bundle=request.bundle,
            tensors=tensors or {},
            meta=wire,
            created_us=request.created_us,
            codec=Codec.FP16,
        )
        encoded = encode_envelope(result, compress=False)
        self._results_by_status[meta.status].inc()
        return self.topics.results(request.site), encoded

    def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish result envelopes, those for the same site joined into as few messages
        as fit (:func:`~fogline.compression.join_envelopes`)."""
        if self._mqtt is None:
            return
        if len(messages) == 1:
            topic, payload = messages[0]
            self._last_publish = self._mqtt.publish(topic, payload, 1)
            return
        by_topic: dict[str, list[bytes]] = {}
        for topic, payload in messages:
            by_topic.setdefault(topic, []).append(payload)
        for topic, payloads in by_topic.items():
            for message in join_envelopes(payloads):
                self._last_publish = self._mqtt.publish(topic, message, 1)

    def _reply(
        self,
        request: Envelope,
        meta: ResultMeta,
        tensors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Publish a RESULT for ``request`` to its site's results topic."""
        self._publish([self._result(request, meta, tensors)])

    def _reply_with(
        self,
        request: Envelope,
        label: int,
        confidence: float,
        output_name: str,
        output: np.ndarray,
    ) -> None:
        """Answer a re-sent item with the result it already has."""
        meta = ResultMeta.ok(label, confidence, duplicate=True)
        self._reply(request, meta, {output_name: output.reshape(-1)})


def _fetched(source: BundleSource, bundle_id: str) -> Bundle:
    """``bundle_id`` from ``source``, checked to be the version asked for."""
    bundle = source.fetch(bundle_id)
    if bundle.id != bundle_id:
        raise ConfigError(f"{source!r} answered bundle {bundle.id} for {bundle_id}")
    return bundle


def _ids(items: Sequence[_Item]) -> str:
    """Items by site and message id, for a log line (the first few)."""
    head = ", ".join(f"{it.env.site}/{it.env.message_id.hex()}" for it in items[:3])
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return f"item{'s' if len(items) != 1 else ''} {head}{more}"


def _output_row(done: Completed, name: str, retry_ms: int) -> np.ndarray | ResultMeta:
    """The item's output row (1-D), or why it has none: the answer to send instead."""
    if isinstance(done.error, DeadlineExceededError):
        # Waited past the stream lane's timeout: refused like a full queue, re-sent later.
        return ResultMeta.busy(retry_ms)
    if done.error is not None:
        log.warning("inference failed for one item: %s", done.error)
        return ResultMeta.failed(f"inference failed: {done.error}")
    outputs = done.outputs or {}
    rows = outputs.get(name)
    if rows is None or rows.ndim == 0 or rows.shape[0] != 1:
        shape = None if rows is None else tuple(rows.shape)
        return ResultMeta.failed(
            f"inference failed: output {name!r} has shape {shape}, expected 1 row"
        )
    return rows.reshape(-1)


def _argmax_like_numpy(values: list[float]) -> int:
    """np.argmax's answer (for values that hold a NaN: the first NaN)."""
    return int(np.argmax(np.asarray(values)))


def _feed(env: Envelope, served: _Served) -> dict[str, np.ndarray]:
    """The item's tensors the cloud part reads, in the types it declares (the codec may
    decode to another float type)."""
    feed: dict[str, np.ndarray] = {}
    for name, dtype in zip(served.inputs, served.dtypes, strict=True):
        arr = env.tensors[name]
        feed[name] = arr if arr.dtype == dtype else arr.astype(dtype)
    return feed


def _check_features(tensors: Mapping[str, np.ndarray], inputs: tuple[str, ...]) -> str | None:
    """Why an item's tensors cannot join a batch, or None. One item per envelope: each
    tensor carries a leading batch axis of length 1."""
    for name in inputs:
        arr = tensors.get(name)
        if arr is None:
            return f"features lack tensor {name!r}"
        if arr.ndim == 0 or arr.shape[0] != 1:
            return f"tensor {name!r} has shape {tuple(arr.shape)}; expected a leading axis of 1"
    return None
