"""The forwarded items' way to the cloud and back: thin loops over the delivery core.

:class:`Courier` wires the agent's :class:`~._delivery.DeliveryCore` (what is pending, when
to re-send, who stops waiting) to its :class:`~._journal.Journal` (the outbox) and its
:class:`~._transport.Transport` (MQTT), and hands each item's final outcome to the caller
that waits for it or to ``on_answer``. Every method here is an adapter: it takes the time,
asks the core what to do, and does it — publishing, reading the outbox, settling futures,
counting. The threads that run them (journal, resend, deadlines; paho's network thread
for results) are started and stopped by :class:`~._agent.Agent`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

from fogline.compression import Envelope, MetaError, ResultStatus, mark_resent
from fogline.edge_agent._answer import Answer, Delivery, result_meta, settle
from fogline.edge_agent._delivery import DeliveryCore, Pending
from fogline.edge_agent._health import HealthWindow
from fogline.edge_agent._journal import Journal, Outgoing
from fogline.edge_agent._loaded import LoadedBundle
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent._outbox import RESERVE_BYTES, DamagedRow, Eviction, OutboxLimits
from fogline.edge_agent._transport import Transport
from fogline.edge_agent.errors import (
    AgentError,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    CloudUnavailableError,
    NotRunningError,
    OutboxError,
    OutboxEvictedError,
    OutboxQuarantinedError,
)
from fogline.messaging import MqttSettings

__all__ = ["Courier", "Item"]

log = logging.getLogger("fogline.edge_agent")

PendingItem = Pending[Future[Answer]]
Item = tuple[PendingItem, Future[Answer]]  # what the journal carries for each new item
Release = Callable[[list[Outgoing[Item]], list[Eviction], bool], None]

_RESEND_TICK_S = 0.02
_GAUGE_EVERY_S = 0.5
_EXPIRE_EVERY_S = 1.0


class Courier:
    """Delivery of one agent's forwarded items.

    ``loaded(bundle_id)`` gives the loaded bundle of that id while the agent still holds
    it (the one in use, or the one a swap replaced), else the one in use; ``on_answer()``
    the current callback, both read at each use; ``health`` (optional) is told, for each
    cloud answer, the edge's own label and the cloud's; ``halt`` ends the resend and
    deadline loops."""

    def __init__(
        self,
        *,
        site: str,
        settings: MqttSettings,
        delivery: DeliveryCore[Future[Answer]],
        metrics: AgentMetrics,
        timeout_ms: int,
        loaded: Callable[[str | None], LoadedBundle],
        on_answer: Callable[[], Callable[[Delivery], None] | None],
        halt: threading.Event,
        health: HealthWindow | None = None,
    ) -> None:
        self.health = health
        self.site = site
        self.delivery = delivery
        self.metrics = metrics
        self._timeout_ms = timeout_ms
        self._loaded = loaded
        self._on_answer = on_answer
        self._halt = halt
        self.transport = Transport(settings, site, self.on_result, metrics)
        self._journal: Journal[Item] | None = None

    @property
    def journal(self) -> Journal[Item] | None:
        return self._journal

    def open(
        self,
        path: Path,
        limits: OutboxLimits,
        *,
        synchronous: str,
        release: Release | None = None,
    ) -> Journal[Item]:
        """Open the outbox (raises :class:`OutboxError`) and take over what an earlier run
        left in it. ``release`` replaces :meth:`release` as the journal's hook."""
        delivery = self.delivery
        journal: Journal[Item] = Journal(
            path,
            limits,
            synchronous="full" if synchronous == "full" else "normal",
            site=self.site,
            release=release or self.release,
            fail=self._fail,
            finished=delivery.journal_done,
        )
        self._journal = journal
        # Read at each scrape: the gauges are the outbox's own figures, whatever failed.
        self.metrics.outbox_items.set_function(lambda: len(journal))
        self.metrics.outbox_bytes.set_function(lambda: journal.total_bytes)
        damaged = journal.take_damaged()
        if damaged:
            self._quarantine(damaged, at_start=True)
        recovered = journal.items()
        if recovered:
            now_w, now_p = time.time(), time.perf_counter()
            delivery.recover(
                (
                    (item.message_id, item.tag, now_p - max(0.0, now_w - item.created_s))
                    for item in recovered
                ),
                time.monotonic(),
            )
            log.info(
                "site %s: %d unanswered items recovered from the outbox %s",
                self.site,
                len(recovered),
                path,
            )
        free = journal.free_bytes()
        if free is not None and free < 2 * RESERVE_BYTES:
            log.warning(
                "site %s: outbox storage nearly full at start: %d bytes free on the file "
                "system of %s; new items are refused (outbox storage full, HTTP 507) while "
                "less than %d bytes would be left; the %d items in the outbox are still "
                "delivered",
                self.site,
                free,
                path,
                RESERVE_BYTES,
                len(journal),
            )
        self.update_gauges()
        return journal

    def send(self, out: Outgoing[Item]) -> None:
        """Hand new items to the journal; with ``out.done``, wait until they are stored
        and released (published, or answered at once)."""
        journal = self._journal
        if journal is None:
            for _p, fut in out.items:
                settle(fut, None, OutboxError("the outbox is not open"))
            return
        self.delivery.journal_started(len(out.entries))
        journal.put(out)
        if out.done is not None:
            out.done.wait()

    def close(self, message: str) -> None:
        """Fail every caller still waiting with ``message``; disconnect; close the outbox.
        The journal thread must have ended."""
        for fut in self.delivery.take_waiters():
            settle(fut, None, NotRunningError(message))
        self.transport.stop()
        journal = self._journal
        if journal is not None:
            try:
                journal.close()
            except OutboxError:
                log.exception("site %s: closing the outbox failed", self.site)

    # journal thread: what the journal hands back

    def release(
        self, outgoing: list[Outgoing[Item]], evicted: list[Eviction], stored: bool
    ) -> None:
        """Admit the stored items to the delivery core, then publish them: nothing leaves
        the site before it is on disk."""
        if not stored:
            return
        connected = self.transport.connected
        admitted = self.delivery.admit(
            (
                (entry[0], entry[1], p, fut)
                for out in outgoing
                for entry, (p, fut) in zip(out.entries, out.items, strict=True)
            ),
            {e.item.message_id for e in evicted},
            time.monotonic(),
            connected=connected,
        )
        if evicted:
            self._evicted(evicted)
        if admitted.send:
            sent = self.transport.publish_many(admitted.send)
            if sent:
                self.metrics.bytes_sent.inc(sent)
        for mid, p, fut in admitted.unserved:
            self._answer_unserved(fut, p, mid, CloudUnavailableError(mid.hex(), admitted.why))

    def _fail(self, outgoing: list[Outgoing[Item]], error: OutboxError) -> None:
        """New items the journal could not store or release: ``error`` is their only
        outcome."""
        self.delivery.abandon(entry[0] for out in outgoing for entry in out.entries)
        for out in outgoing:
            for p, fut in out.items:
                p.waiter = None
                settle(fut, None, error)

    # outcomes

    def _answer_unserved(
        self, future: Future[Answer], p: PendingItem, mid: bytes, error: AgentError
    ) -> None:
        """A caller stops waiting for the cloud: the edge's own answer, or ``error``."""
        if not self.delivery.degrades(p):
            settle(future, None, error)
            return
        loaded = self._loaded(p.bundle)
        ms = (time.perf_counter() - p.arrived) * 1000.0
        answer = Answer(
            "edge",
            p.label,
            p.conf,
            p.rel,
            p.conf,
            loaded.thresholds,
            p.bundle or loaded.id,
            mid.hex(),
            ms,
            None,
            "degraded",
            p.tag,
        )
        self.metrics.degraded.inc()
        self.metrics.latency.observe("edge", ms / 1000.0)
        settle(future, answer, None)

    def _quarantine(self, rows: Sequence[DamagedRow], *, at_start: bool = False) -> None:
        """Count, log and move out the damaged rows, and end the items they were: the
        caller still waiting, else ``on_answer``, gets :class:`OutboxQuarantinedError`
        (for a row found at start, as a recovered outcome)."""
        journal = self._journal
        for row in rows:
            self.metrics.quarantined.labels(reason=row.kind).inc()
            mid = row.message_id
            name = mid.hex() if mid is not None else f"with a {row.key_type} key"
            log.error(
                "site %s: outbox row %s is damaged (%s: %s): moved to quarantine, never sent",
                self.site,
                name,
                row.kind,
                row.reason,
            )
            if journal is not None:
                try:
                    journal.quarantine(row)
                except OutboxError:
                    log.exception(
                        "site %s: cannot move the damaged outbox row %s; it stays in the "
                        "outbox, unsent, until a later start moves it",
                        self.site,
                        name,
                    )
            if mid is None:
                continue  # no item of ours to end: nobody could be told
            error = OutboxQuarantinedError(mid.hex(), row.kind, row.reason)
            taken = self.delivery.take([mid])
            for _mid, p, fut in taken:
                self._finish(mid, p, fut, error)
            if not taken and at_start:
                p = Pending(None, time.perf_counter(), tag=row.tag, recovered=True)
                self._finish(mid, p, None, error)

    def _evicted(self, evictions: Sequence[Eviction]) -> None:
        """Count, log and end the items an outbox bound pushed out."""
        by_reason: dict[str, int] = {}
        for ev in evictions:
            by_reason[ev.reason] = by_reason.get(ev.reason, 0) + 1
        for reason, n in by_reason.items():
            self.metrics.evictions.labels(reason=reason).inc(n)
            log.warning(
                "site %s: evicted %d unanswered items from the outbox (bound %s reached)",
                self.site,
                n,
                reason,
            )
        reasons = {ev.item.message_id: ev.reason for ev in evictions}
        for mid, p, fut in self.delivery.evict(reasons):
            self._finish(mid, p, fut, OutboxEvictedError(mid.hex(), reasons[mid]))

    def _finish(
        self,
        mid: bytes,
        p: PendingItem,
        future: Future[Answer] | None,
        outcome: Answer | AgentError,
    ) -> None:
        """Hand an item's final outcome to its caller, or to ``on_answer`` if none waits."""
        answer = outcome if isinstance(outcome, Answer) else None
        error = outcome if isinstance(outcome, AgentError) else None
        if future is not None:
            settle(future, answer, error)
            return
        self.metrics.detached.labels(kind="answer" if answer is not None else "error").inc()
        callback = self._on_answer()
        if callback is None:
            return
        try:
            callback(Delivery(mid.hex(), p.tag, answer, error, p.recovered))
        except Exception:
            log.exception("site %s: on_answer failed for %s", self.site, mid.hex())

    # paho network thread

    def on_result(self, env: Envelope) -> None:
        mid = env.message_id
        m = self.metrics
        hexid = mid.hex()
        try:
            meta = result_meta(env)
        except MetaError as exc:
            action = self.delivery.on_result(mid, None, time.monotonic())
            if action.kind == "unknown":
                self._unknown(mid)
                return
            raw = env.meta.get("worker")
            m.rejected.labels(reason="bad_result").inc()
            log.warning("site %s: unusable result for %s: %s", self.site, hexid, exc.detail)
            outcome: Answer | AgentError = CloudFailedError(
                hexid, f"malformed result: {exc.detail}", raw if isinstance(raw, str) else None
            )
        else:
            action = self.delivery.on_result(
                mid, meta.status, time.monotonic(), retry_after_ms=meta.retry_after_ms
            )
            if action.kind == "unknown":
                self._unknown(mid)
                return
            if action.kind == "busy":
                m.cloud_results.labels(status="busy").inc()
                return
            p = action.pending
            if meta.status is ResultStatus.OK and p is not None:
                ms = (time.perf_counter() - p.arrived) * 1000.0
                m.cloud_results.labels(status="ok").inc()
                m.latency.observe("cloud", ms / 1000.0)
                # The bundle that decided the item (the cloud ran its tail), not the one
                # in use now: a swap in between must not relabel the answer.
                bundle = p.bundle or env.bundle
                loaded = self._loaded(bundle)
                health = self.health
                if health is not None:
                    health.compare(p.label, meta.label)
                outcome = Answer(
                    "cloud",
                    meta.label,
                    meta.confidence,
                    p.rel,
                    p.conf,
                    loaded.thresholds,
                    bundle,
                    hexid,
                    ms,
                    meta.worker,
                    "ok",
                    p.tag,
                )
            else:
                m.cloud_results.labels(status="error").inc()
                outcome = CloudFailedError(hexid, meta.error or "unspecified error", meta.worker)
        p = action.pending
        if p is None:  # a final action always carries its item
            return
        # Handed out first, deleted after: a crash in between costs a second outcome after
        # the restart (marked recovered), never a lost one. Deleting first would turn the
        # same moment into a lost answer: the restarted agent would not ask again.
        try:
            self._finish(mid, p, action.waiter, outcome)
        finally:
            journal = self._journal
            if journal is not None:
                journal.put(mid)
            else:
                self.delivery.journal_done(1)

    def _unknown(self, mid: bytes) -> None:
        self.metrics.duplicates.inc()
        log.debug("site %s: result for %s matches nothing pending", self.site, mid.hex())

    # resend thread: what is due, bounds by age, gauges

    def resend_loop(self) -> None:
        delivery = self.delivery
        next_gauges = next_expiry = time.monotonic()
        while not self._halt.wait(_RESEND_TICK_S):
            now = time.monotonic()
            journal = self._journal
            if now >= next_expiry and journal is not None:
                next_expiry = now + _EXPIRE_EVERY_S
                try:
                    expired = journal.expire()
                except OutboxError:
                    log.exception("site %s: outbox expiry failed", self.site)
                    expired = []
                if expired:
                    self._evicted(expired)
                damaged = journal.take_damaged()
                if damaged:
                    self._quarantine(damaged)
            due = delivery.due(now, connected=self.transport.connected)
            if due:
                self._resend(due)
            if now >= next_gauges:
                next_gauges = now + _GAUGE_EVERY_S
                self.update_gauges()

    def _resend(self, due: list[tuple[bytes, bool]]) -> None:
        """Publish the items the delivery core says are due, each checked as it is read
        back (:meth:`Journal.envelope`); a damaged one is quarantined instead. Whatever
        one item does, the others are sent."""
        journal = self._journal
        if journal is None:
            return
        payloads: list[bytes] = []
        damaged: list[DamagedRow] = []
        for mid, again in due:
            try:
                got = journal.envelope(mid)
                if got is None:
                    continue
                if isinstance(got, DamagedRow):
                    damaged.append(got)
                    continue
                if again:  # tell the cloud to look for an answer it may already have
                    # Checked above: the checksum redone here covers verified bytes only.
                    got = mark_resent(got)
                    self.metrics.resends.inc()
                payloads.append(got)
            except OutboxError:
                log.exception("site %s: outbox read failed for %s", self.site, mid.hex())
            except Exception:
                log.exception("site %s: re-sending %s failed", self.site, mid.hex())
        if damaged:
            self._quarantine(damaged)
        sent_bytes = self.transport.publish_many(payloads) if payloads else 0
        if sent_bytes:
            self.metrics.bytes_sent.inc(sent_bytes)

    def update_gauges(self) -> None:
        journal = self._journal
        if journal is None:
            return
        m = self.metrics
        oldest = journal.oldest_created_s()
        m.outbox_oldest_age.set(0.0 if oldest is None else max(0.0, time.time() - oldest))

    # deadlines

    def deadline_loop(self) -> None:
        delivery = self.delivery
        tick = min(0.05, max(0.001, delivery.policy.timeout_s / 4))
        timeout_ms = self._timeout_ms
        while not self._halt.wait(tick):
            expired = delivery.expire_waits(time.monotonic())
            if not expired:
                continue
            self.metrics.timeouts.inc(len(expired))
            for mid, p, fut in expired:
                error: AgentError = (
                    CloudBusyError(mid.hex(), None, None)
                    if p.busy
                    else CloudTimeoutError(mid.hex(), timeout_ms)
                )
                self._answer_unserved(fut, p, mid, error)
            log.debug("site %s: %d forwarded items timed out", self.site, len(expired))
