"""MQTT adapter of the agent: publish feature envelopes, hand result envelopes back.

One :class:`~fogline.messaging.MqttConnection` per agent (QoS 1, reconnect with backoff,
``TCP_NODELAY``, TLS, MQTT 3.1.1 or 5). Correlating results with requests is the agent's
job (it owns the outbox); this layer only checks that a message on the result topic is
a well-formed result for this site.

Anything on the result topic that is not a well-formed result for this site is counted
by reason and logged (with exponentially thinning log lines, so a flood cannot fill the
disk), never raised into paho's network thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fogline.compression import Envelope, Kind, decode_message, join_envelopes
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent.errors import BrokerError
from fogline.messaging import MqttConnection, MqttError, MqttSettings, Supervisor

__all__ = ["Transport"]

log = logging.getLogger("fogline.edge_agent")


class Transport:
    """Feature publishing and result intake for one site.

    ``on_result(envelope)`` is called on paho's network thread for every well-formed
    result addressed to this site; it must be quick and must not block.
    """

    def __init__(
        self,
        settings: MqttSettings,
        site: str,
        on_result: Callable[[Envelope], None],
        metrics: AgentMetrics,
    ) -> None:
        topics = settings.topics
        self.site = site
        self.features_topic = topics.features(site)
        self.results_topic = topics.results(site)
        self._on_result = on_result
        self._metrics = metrics
        #: Where a result whose handling raised is logged and counted (the agent sets its
        #: own); without one it is only logged.
        self.supervisor: Supervisor | None = None
        self._last: mqtt.MQTTMessageInfo | None = None
        self._reject_counts: dict[str, int] = {}
        self._reject_lock = threading.Lock()
        # Results at QoS 1 only help a persistent session (the broker keeps them while
        # the agent is away). In a clean session they bring nothing the outbox does not
        # already give (an unanswered item is re-sent and the cloud answers it from its
        # store), and each one costs a PUBACK on both sides.
        self.results_qos = 0 if settings.clean_start else 1
        self.sync_topic = topics.sync(site)
        self._on_nudge: Callable[[], None] | None = None
        self._conn = MqttConnection(
            settings, self._on_message, subscriptions=((self.results_topic, self.results_qos),)
        )

    @property
    def connected(self) -> bool:
        return self._conn.is_connected

    @property
    def connection(self) -> MqttConnection:
        return self._conn

    def start(self, wait: bool = True) -> None:
        """Connect; with ``wait``, block until subscribed or raise :class:`BrokerError`.

        Without ``wait`` the connection is made in the background and retried with backoff
        until it succeeds, so an agent can start while its broker is away.
        """
        try:
            self._conn.start(wait=wait)
        except MqttError as exc:
            raise BrokerError(str(exc)) from exc

    def stop(self) -> None:
        self._conn.stop()

    def publish(self, payload: bytes) -> bool:
        """Hand one message (one or more envelopes) to paho (QoS 1). False when paho
        refused it (not connected, or its queue is closed): the outbox keeps its items and
        re-sends them later."""
        try:
            info = self._conn.publish(self.features_topic, payload, qos=1)
        except (ValueError, OSError, RuntimeError) as exc:
            log.debug("site %s: publish failed: %s", self.site, exc)
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._last = info
        return True

    def publish_many(self, payloads: list[bytes]) -> int:
        """Publish envelopes that are ready together, joined into as few messages as fit
        (:func:`~fogline.compression.join_envelopes`); the bytes paho accepted."""
        sent = 0
        for message in join_envelopes(payloads):
            if self.publish(message):
                sent += len(message)
        return sent

    def flush(self, timeout_s: float) -> bool:
        """Wait until the last published envelope is acknowledged by the broker (QoS 1)."""
        info = self._last
        if info is None:
            return True
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    # paho network thread

    def _reject(self, reason: str, detail: str) -> None:
        self._metrics.rejected.labels(reason=reason).inc()
        with self._reject_lock:
            n = self._reject_counts.get(reason, 0) + 1
            self._reject_counts[reason] = n
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th … of each reason
            log.warning(
                "site %s: rejected a message on %s (%s: %s; %d so far)",
                self.site,
                self.results_topic,
                reason,
                detail,
                n,
            )

    def watch_sync(self, on_nudge: Callable[[], None]) -> None:
        """Subscribe to the site's retained sync topic; ``on_nudge()`` is called (on
        paho's network thread) for each message there. Its payload is never read: a
        nudge is only a hint to refresh now, and the refresh verifies everything."""
        self._on_nudge = on_nudge
        self._conn.subscribe(self.sync_topic, 1)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.sync_topic:
            nudge = self._on_nudge
            if nudge is not None:
                nudge()
            return
        envelopes, error = decode_message(payload)
        for env in envelopes:
            if env.kind is not Kind.RESULT:
                self._reject("unexpected_kind", f"a {env.kind.name} envelope on the result topic")
                continue
            if env.site != self.site:
                self._reject("foreign_site", f"result for site {env.site!r}")
                continue
            try:
                self._on_result(env)
            except Exception as exc:  # one result must not stop the others of its message
                supervisor = self.supervisor
                what = f"the result for {env.message_id.hex()} on {topic}"
                if supervisor is None:
                    log.exception("site %s: handling %s failed", self.site, what)
                else:
                    supervisor.contained("mqtt_handler", what, exc)
        if error is not None:
            self._reject(error.reason, error.detail)
