"""The cloud worker: MQTT in, dynamic batches through the bundle's cloud part, results out.

Data path (threads in brackets)::

    broker ─► on_message [paho network thread]: decode, check, queue (or answer at once:
              │                                  unknown bundle → error, queue full → busy)
              ▼
            BatchRunner [batcher thread]: stack a batch per bundle, run the backend,
              │                           publish one RESULT per item to its site
              ▼
            _StoreWriter [store thread]: write the batch's results in one transaction

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
from typing import Any

import numpy as np
from paho.mqtt.client import MQTTMessageInfo

from fogline.cloud_service._backends import Backend, BackendChoice, select_backend
from fogline.cloud_service._batcher import Batch, BatchPolicy, BatchRunner
from fogline.cloud_service._config import CloudConfig
from fogline.cloud_service._metrics import CloudMetrics
from fogline.cloud_service._store import ResultStore, StoredResult
from fogline.cloud_service.errors import (
    BackendError,
    BrokerError,
    ConfigError,
    DeadlineExceededError,
    QueueFullError,
    StoreError,
    UnknownBundleError,
)
from fogline.compression import (
    Codec,
    Envelope,
    Kind,
    ResultMeta,
    decode_message,
    encode_envelope,
    join_envelopes,
    now_us,
)
from fogline.messaging import Inbound, MqttConnection, MqttError
from fogline.sync import Bundle, BundleError

__all__ = ["CloudWorker"]

log = logging.getLogger("fogline.cloud")

BackendLoader = Callable[[Bundle], Backend]


_Key = tuple[str, bytes]
_RECENT_RESULTS = 50_000


class _Delivery:
    """One MQTT message and how many of its envelopes are still being handled: a message
    can carry several items (:func:`~fogline.compression.join_envelopes`), and the broker
    gets its PUBACK only when the last of them is finished with."""

    __slots__ = ("inbound", "left")

    def __init__(self, inbound: Inbound, left: int) -> None:
        self.inbound = inbound
        self.left = left


@dataclass(frozen=True)
class _Item:
    env: Envelope
    received_us: int
    delivery: _Delivery | None = None
    # Copies of this item that arrived while it was queued or running.
    twins: list[_Delivery] = field(default_factory=list)

    @property
    def key(self) -> _Key:
        return (self.env.site, self.env.message_id)


# A result this worker published, kept to answer re-sends of the same item: label,
# confidence, output row, output name. A plain tuple of atoms, which the garbage collector
# stops tracking: tens of thousands of tracked objects here made every full collection
# stop the worker for 10-20 ms.
_Recent = tuple[int, float, np.ndarray, str]


@dataclass(frozen=True)
class _Served:
    """A bundle this worker answers for, with its loaded backend."""

    bundle: Bundle
    backend: Backend
    inputs: tuple[str, ...]
    output: str


class _StoreWriter:
    """Writes results on its own thread, gathering them for up to ``linger_s`` so a busy
    worker makes a few large transactions per second instead of one per batch; then
    acknowledges the MQTT messages whose results the transaction stored.

    A failing store is retried with backoff until it works or the worker stops: the
    messages stay unacknowledged meanwhile, which also stops the broker from sending this
    worker more than its in-flight window."""

    def __init__(
        self,
        store: ResultStore,
        metrics: CloudMetrics,
        ack: Callable[[list[_Delivery]], None],
        *,
        linger_s: float = 0.05,
        max_rows: int = 5000,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._ack = ack
        self._linger_s = linger_s
        self._max_rows = max_rows
        self._lock = threading.Lock()
        # Two conditions on one lock: the writer waits for work, flush() for its end.
        self._work = threading.Condition(self._lock)
        self._written = threading.Condition(self._lock)
        self._rows: list[StoredResult] = []
        self._acks: list[_Delivery] = []
        self._pending = 0
        # The writer's state, which decides whether a put must wake it: only when it
        # waits for a first write, or lingers and max_rows has come. A wake-up of another
        # thread costs the waker tens of microseconds on a virtual machine; waking the
        # writer for every batch while it lingers anyway was a tenth of a busy worker's
        # time in Python.
        self._idle = False
        self._lingering = False
        self._closing = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fogline-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, rows: list[StoredResult], acks: list[_Delivery]) -> None:
        with self._lock:
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
            self._write(*taken)

    def _write(self, rows: list[StoredResult], acks: list[_Delivery]) -> None:
        attempt = 0
        while True:
            try:
                self._store.put_many(rows)
                break
            except StoreError as exc:
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
            self._written.notify_all()


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
    """Serves the cloud part of one or more bundles from MQTT.

    ``start()`` loads and warms every bundle, opens the store and subscribes; ``stop()``
    answers what is queued and shuts down. Several workers may share the load through
    the MQTT shared subscription named by ``config.share_group``.

    ``store`` lets a caller share a :class:`ResultStore` (the worker then does not close
    it); ``backend_loader`` replaces the configured backend, e.g. to wrap or instrument it.
    """

    def __init__(
        self,
        config: CloudConfig,
        *,
        store: ResultStore | None = None,
        backend_loader: BackendLoader | None = None,
        metrics: CloudMetrics | None = None,
    ) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.topics = config.topics
        self.metrics = metrics if metrics is not None else CloudMetrics()
        self.backend_choice: BackendChoice | None = None
        self._store = store
        self._owns_store = store is None
        self._backend_loader = backend_loader
        self._served: dict[str, _Served] = {}
        b = config.batching
        self._runner: BatchRunner[_Item] = BatchRunner(
            BatchPolicy(
                max_batch_size=b.max_batch_size,
                max_queue_delay_ms=b.max_queue_delay_ms,
                max_queue_items=b.max_queue_items,
                retry_after_ms=b.busy_retry_after_ms,
            ),
            self._run_batch,
        )
        self._writer: _StoreWriter | None = None
        self._mqtt: MqttConnection | None = None
        self._last_publish: MQTTMessageInfo | None = None
        self._reject_log = _RateLimitedLog()
        # Idempotency: results published recently, and items queued or running (whose
        # copies wait for them), both keyed by (site, message id).
        self._dlock = threading.Lock()
        self._recent: OrderedDict[_Key, _Recent] = OrderedDict()
        self._in_flight: dict[_Key, _Item] = {}
        self._unacked = 0
        self._lock = threading.Lock()
        self._started = False
        self._running = False
        self._accepting = False
        self._stopped = False
        self._bundles_ready = False
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    # lifecycle

    def start(self, *, wait: bool = True) -> CloudWorker:
        """Load and warm the bundles, open the store, connect and subscribe.

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
            self._load_bundles()
            if self._store is None:
                self._store = ResultStore(self.config.store.url)
            self._writer = _StoreWriter(self._store, self.metrics, self._ack)
            self._writer.start()
            self._runner.start()
            self._accepting = True
            self._connect(wait)
        except BaseException:
            self.stop()
            raise
        self._running = True
        log.info(
            "cloud worker %s serving %s (%s)",
            self.worker_id,
            ", ".join(f"{b} on {s.backend.name}" for b, s in self._served.items()),
            self.backend_choice.reason if self.backend_choice else "backend supplied by caller",
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
            mqtt.client.unsubscribe(self._subscription)
        self._runner.stop(timeout_s)
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
        """Bundles loaded and warmed, and connected to the broker."""
        return (
            self._bundles_ready
            and not self._stopped
            and self._mqtt is not None
            and self._mqtt.is_connected
        )

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
        if not self._runner.wait_idle(timeout_s):
            return False
        if self._writer is None:
            return True
        return self._writer.flush(max(0.0, deadline - time.monotonic()))

    @property
    def store(self) -> ResultStore | None:
        """The result store (None before ``start``)."""
        return self._store

    @property
    def bundle_ids(self) -> tuple[str, ...]:
        return tuple(self._served)

    @property
    def queue_depth(self) -> int:
        return self._runner.depth

    def status(self) -> dict[str, Any]:
        """A JSON-friendly summary for ``/readyz`` and logs."""
        return {
            "ready": self.ready,
            "worker": self.worker_id,
            "bundles": list(self._served),
            "backends": {bid: s.backend.name for bid, s in self._served.items()},
            "backend_reason": self.backend_choice.reason if self.backend_choice else None,
            "mqtt_connected": bool(self._mqtt and self._mqtt.is_connected),
            "queue_depth": self._runner.depth,
            "unacknowledged": self._unacked,
        }

    # start-up pieces

    def _load_bundles(self) -> None:
        cfg = self.config
        if self._backend_loader is None:
            choice = select_backend(cfg.backend)
            self.backend_choice = choice

            def load(bundle: Bundle) -> Backend:
                return choice.load(
                    bundle.cloud_model_path,
                    max_batch_size=cfg.batching.max_batch_size,
                    threads=cfg.threads,
                    engine_cache_dir=cfg.tensorrt.engine_cache_dir,
                    fp16=cfg.tensorrt.fp16,
                    device_id=cfg.tensorrt.device_id,
                    execution_contexts=cfg.tensorrt.execution_contexts,
                    opt_batch_size=cfg.tensorrt.opt_batch_size,
                )

            loader: BackendLoader = load
        else:
            loader = self._backend_loader
        for root in cfg.bundles:
            try:
                bundle = Bundle.load(root)
            except BundleError as exc:
                raise ConfigError(f"bundle {root}: {exc}") from exc
            if bundle.id in self._served:
                raise ConfigError(f"bundle {bundle.id} is listed twice ({root})")
            backend = loader(bundle)
            missing = [n for n in backend.input_names if n not in bundle.edge.feature_outputs]
            if missing:
                raise ConfigError(
                    f"bundle {bundle.id}: the cloud model needs {', '.join(missing)}, which the "
                    f"edge part does not send (feature_outputs: "
                    f"{', '.join(bundle.edge.feature_outputs)})"
                )
            outputs = getattr(backend, "output_names", None)
            if outputs is not None and bundle.cloud.output not in outputs:
                raise ConfigError(
                    f"bundle {bundle.id}: the cloud model has no output {bundle.cloud.output!r}"
                )
            backend.warmup()
            self._served[bundle.id] = _Served(
                bundle=bundle,
                backend=backend,
                inputs=tuple(backend.input_names),
                output=bundle.cloud.output,
            )
        self._bundles_ready = True

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

    # ingest (paho network thread)

    def _on_message(self, topic: str, payload: bytes, inbound: Inbound) -> None:
        # Runs on paho's network thread: an exception here would stop all MQTT traffic.
        with self._dlock:
            self._unacked += 1
        self.metrics.acks_pending.set(self._unacked)
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
        for env in envelopes:
            try:
                done = self._ingest(topic, env, received_us, delivery)
            except Exception:
                self.metrics.rejected.labels("internal").inc()
                log.exception("could not handle a message on %s", topic)
                done = True
            if done:
                self._ack([delivery])

    def _ingest(self, topic: str, env: Envelope, received_us: int, delivery: _Delivery) -> bool:
        """Handle one envelope of a message; True when it is finished with (its share of
        the acknowledgement is given now), False when an item now owns that share."""
        if env.kind is not Kind.FEATURES:
            self._reject("wrong_kind", f"rejected a {env.kind.name} message on {topic}")
            return True
        try:
            site = self.topics.site_of(topic)
        except ValueError:
            self._reject("bad_topic", f"rejected a message on unexpected topic {topic}")
            return True
        if site != env.site:
            self._reject(
                "site_mismatch",
                f"rejected a message for site {env.site!r} published on site {site!r}'s topic",
            )
            return True
        served = self._served.get(env.bundle)
        if served is None:
            self._reply(env, ResultMeta.failed(str(UnknownBundleError(env.bundle))))
            return True
        problem = _check_features(env.tensors, served.inputs)
        if problem is not None:
            self._reply(env, ResultMeta.failed(f"bundle {env.bundle}: {problem}"))
            return True
        key: _Key = (env.site, env.message_id)
        item = _Item(env, received_us, delivery)
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
            return True
        if twin_of is not None:
            self.metrics.duplicates.labels("in_flight").inc()
            return False
        busy_ms: int | None = None
        if not self._accepting:
            busy_ms = self.config.batching.busy_retry_after_ms
        else:
            try:
                self._runner.submit(env.bundle, item)
            except QueueFullError as exc:
                busy_ms = exc.retry_after_ms
            except RuntimeError:  # stopped between the check above and here
                busy_ms = self.config.batching.busy_retry_after_ms
        self.metrics.queue_depth.set(self._runner.depth)
        if busy_ms is None:
            return False
        with self._dlock:
            self._in_flight.pop(key, None)
            twins = list(item.twins)
        self._reply(env, ResultMeta.busy(busy_ms))
        self._ack(twins)
        return True

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
            unacked = self._unacked
        if not done:
            return
        self.metrics.acks_pending.set(max(0, unacked))
        mqtt = self._mqtt
        if mqtt is None:
            return
        for inbound in done:
            mqtt.ack(inbound)

    def _reject(self, reason: str, message: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self._reject_log.warning(reason, message)

    # batches (batcher thread)

    def _run_batch(self, batch: Batch[_Item]) -> None:
        self.metrics.queue_depth.set(self._runner.depth)
        served = self._served[batch.key]
        start_s = time.monotonic()
        for t in batch.enqueued_s:
            self.metrics.queue_seconds.observe(max(0.0, start_s - t))
        todo = self._answer_from_store(served, batch.items)
        groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
        for i in todo:
            item = batch.items[i]
            shapes = tuple(item.env.tensors[n].shape for n in served.inputs)
            groups.setdefault(shapes, []).append(i)
        stored: list[StoredResult] = []
        acks: list[_Delivery] = []
        for idxs in groups.values():
            self._run_group(served, batch, idxs, start_s, stored, acks)
        if self._writer is not None and (stored or acks):
            self._writer.put(stored, acks)
        else:
            self._ack(acks)

    def _answer_from_store(self, served: _Served, items: Sequence[_Item]) -> list[int]:
        """Answer the re-sent items another worker (or an earlier run of this one) already
        stored; the indices of the others. A store that cannot be read costs a duplicate
        run, not an answer: the insert ignores a key that is already there."""
        store = self._store
        # Only a re-sent item (the agent's resent flag, or the broker's redelivery flag)
        # can have an earlier result: fresh items skip the query.
        maybe = [
            it
            for it in items
            if it.env.resent or (it.delivery is not None and it.delivery.inbound.dup)
        ]
        if store is None or not maybe:
            return list(range(len(items)))
        try:
            found = store.get_many([(it.env.site, it.env.message_id) for it in maybe])
        except StoreError as exc:
            log.warning("cannot look up earlier results (%s); running the batch", exc)
            return list(range(len(items)))
        if not found:
            return list(range(len(items)))
        todo: list[int] = []
        for i, item in enumerate(items):
            hit = found.get((item.env.site, item.env.message_id.hex()))
            if hit is None:
                todo.append(i)
                continue
            self.metrics.duplicates.labels("store").inc()
            output = np.asarray(hit.output, dtype=np.float32).reshape(1, -1)
            self._reply_with(item.env, hit.label, hit.confidence, served.output, output)
            self._ack(self._finish_item(item, (hit.label, hit.confidence, output, served.output)))
        return todo

    def _finish_item(self, item: _Item, recent: _Recent | None) -> list[_Delivery]:
        """Retire an answered item: remember its result, release its copies. Returns the
        acknowledgements it owns (its own and its copies'); acknowledged at once when its
        result needs no storing (``recent`` from the store)."""
        key = item.key
        with self._dlock:
            self._in_flight.pop(key, None)
            if recent is not None:
                self._recent[key] = recent
                if len(self._recent) > _RECENT_RESULTS:
                    self._recent.popitem(last=False)
            return [d for d in (item.delivery, *item.twins) if d is not None]

    def _run_group(
        self,
        served: _Served,
        batch: Batch[_Item],
        idxs: list[int],
        start_s: float,
        stored: list[StoredResult],
        acks: list[_Delivery],
    ) -> None:
        items = [batch.items[i] for i in idxs]
        try:
            feed = {
                n: (
                    items[0].env.tensors[n]
                    if len(items) == 1
                    else np.concatenate([it.env.tensors[n] for it in items])
                )
                for n in served.inputs
            }
            t0 = time.perf_counter()
            out = served.backend.run(feed)
            compute_s = time.perf_counter() - t0
            rows = _batch_rows(out, served.output, len(items))
        except (QueueFullError, DeadlineExceededError) as exc:
            # The model's stream lane (shared with the inference API) is saturated: the
            # items are refused like a full queue, and their agents re-send them.
            retry_ms = getattr(exc, "retry_after_ms", self.config.batching.busy_retry_after_ms)
            for item in items:
                self._reply(item.env, ResultMeta.busy(retry_ms))
                self._ack(self._finish_item(item, None))
            return
        except (BackendError, ValueError, KeyError, TypeError) as exc:
            if len(idxs) > 1:  # find the item that broke the batch; answer the others
                for i in idxs:
                    self._run_group(served, batch, [i], start_s, stored, acks)
                return
            log.warning("inference failed for one item of %s: %s", served.bundle.id, exc)
            self._reply(items[0].env, ResultMeta.failed(f"inference failed: {exc}"))
            self._ack(self._finish_item(items[0], None))
            return
        self.metrics.batch_size.observe(len(items))
        self.metrics.compute_seconds.observe(compute_s)
        compute_ms = round(compute_s * 1000.0, 3)
        completed_us = now_us()
        labels = np.argmax(rows.reshape(len(items), -1), axis=1)
        answers: list[tuple[_Item, int, float, int]] = []
        outgoing: list[tuple[str, bytes]] = []
        for k, (i, item) in enumerate(zip(idxs, items, strict=True)):
            label = int(labels[k])
            confidence = float(rows[k].reshape(-1)[label])
            confidence = round(confidence, 6) if math.isfinite(confidence) else 0.0
            queue_ms = round(max(0.0, start_s - batch.enqueued_s[i]) * 1000.0, 3)
            meta = ResultMeta.ok(label, confidence, queue_ms=queue_ms, compute_ms=compute_ms)
            try:
                outgoing.append(self._result(item.env, meta, {served.output: rows[k]}))
            except ValueError as exc:
                # An output row the result codec refuses (NaN, ±inf, beyond float16): the
                # item fails out loud rather than travel as a wrong "ok".
                log.warning("inference failed for one item of %s: %s", served.bundle.id, exc)
                self._reply(item.env, ResultMeta.failed(f"inference failed: {exc}"))
                self._ack(self._finish_item(item, None))
                continue
            answers.append((item, label, confidence, k))
        # Encode first, then publish: the results for one site travel joined in one message.
        self._publish(outgoing)
        for item, label, confidence, k in answers:
            env = item.env
            acks.extend(self._finish_item(item, (label, confidence, rows[k].copy(), served.output)))
            stored.append(
                StoredResult(
                    site=env.site,
                    message_id=env.message_id.hex(),
                    bundle=env.bundle,
                    label=label,
                    confidence=confidence,
                    output=tuple(rows[k].reshape(-1).tolist()),
                    worker=self.worker_id,
                    created_us=env.created_us,
                    received_us=item.received_us,
                    completed_us=completed_us,
                )
            )

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
        self.metrics.results.labels(meta.status.value).inc()
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


def _batch_rows(out: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    rows = out[name]
    if rows.ndim == 0 or rows.shape[0] != n:
        raise BackendError(f"output {name!r} has shape {rows.shape}, expected {n} rows")
    return rows


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
