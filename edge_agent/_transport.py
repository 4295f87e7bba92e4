"""MQTT adapter of the agent: publish feature envelopes, match result envelopes to requests.

One :class:`~fogline._mqtt.MqttConnection` per agent (QoS 1, reconnect with backoff,
``TCP_NODELAY``, TLS, MQTT 3.1.1 or 5). Requests wait in a dict keyed by message id; the
first of "the result arrived" and "the deadline passed" takes the entry out with
``dict.pop``, which is atomic, so neither side needs a lock and a request resolves once.

Anything on the result topic that is not a well-formed result for this site is counted
by reason and logged (with exponentially thinning log lines, so a flood cannot fill the
disk), never raised into paho's network thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import paho.mqtt.client as mqtt

from fogline._mqtt import MqttConnection, MqttError, MqttSettings
from fogline.compression import Envelope, EnvelopeError, Kind, decode_envelope
from fogline.edge_agent._metrics import AgentMetrics
from fogline.edge_agent.errors import BrokerError

__all__ = ["Transport"]

log = logging.getLogger("fogline.edge_agent")

T = TypeVar("T")

_QUEUED = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)


class Transport(Generic[T]):
    """Feature publishing and result correlation for one site.

    ``on_result(envelope, token)`` is called on paho's network thread with the token given
    to :meth:`publish` for the envelope's message id; it must be quick and must not block.
    """

    def __init__(
        self,
        settings: MqttSettings,
        site: str,
        on_result: Callable[[Envelope, T], None],
        metrics: AgentMetrics,
    ) -> None:
        topics = settings.topics
        self.site = site
        self.features_topic = topics.features(site)
        self.results_topic = topics.results(site)
        self._on_result = on_result
        self._metrics = metrics
        self._pending: dict[bytes, T] = {}
        self._last: mqtt.MQTTMessageInfo | None = None
        self._reject_counts: dict[str, int] = {}
        self._reject_lock = threading.Lock()
        self._conn = MqttConnection(
            settings, self._on_message, subscriptions=((self.results_topic, 1),)
        )

    @property
    def connected(self) -> bool:
        return self._conn.is_connected

    @property
    def pending_count(self) -> int:
        return len(self._pending)

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

    def publish(self, message_id: bytes, payload: bytes, token: T) -> None:
        """Register ``token`` under ``message_id`` and queue the envelope (QoS 1).

        While disconnected paho keeps the message and sends it after reconnecting; the
        caller's deadline covers the case where that never happens.
        """
        self._pending[message_id] = token
        try:
            info = self._conn.publish(self.features_topic, payload, qos=1)
        except (ValueError, OSError) as exc:
            self._pending.pop(message_id, None)
            raise BrokerError(f"cannot publish to {self.features_topic}: {exc}") from exc
        if info.rc not in _QUEUED:
            self._pending.pop(message_id, None)
            raise BrokerError(
                f"cannot publish to {self.features_topic}: {mqtt.error_string(info.rc)}"
            )
        self._last = info

    def take(self, message_id: bytes) -> T | None:
        """Remove and return the token waiting under ``message_id`` (None if gone)."""
        return self._pending.pop(message_id, None)

    def take_all(self) -> list[T]:
        """Remove and return every waiting token (on shutdown)."""
        out: list[T] = []
        while self._pending:
            try:
                _mid, token = self._pending.popitem()
            except KeyError:
                break
            out.append(token)
        return out

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

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            env = decode_envelope(payload)
        except EnvelopeError as exc:
            self._reject(exc.reason, exc.detail)
            return
        if env.kind is not Kind.RESULT:
            self._reject("unexpected_kind", f"a {env.kind.name} envelope on the result topic")
            return
        if env.site != self.site:
            self._reject("foreign_site", f"result for site {env.site!r}")
            return
        token = self._pending.pop(env.message_id, None)
        if token is None:
            self._metrics.late_results.inc()
            log.debug(
                "site %s: result for %s matches nothing pending", self.site, env.message_id.hex()
            )
            return
        try:
            self._on_result(env, token)
        except Exception:
            log.exception(
                "site %s: handling the result for %s failed", self.site, env.message_id.hex()
            )
