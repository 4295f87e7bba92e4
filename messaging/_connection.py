"""The MQTT connection: one paho client with reconnects, ``TCP_NODELAY``, writes from the
publishing thread, re-subscription after reconnect, and MQTT 5 publish properties.

What happens to the connection is said out loud (``fogline.messaging`` logger): the first
connect, every loss with its reason, reconnect attempts with their backoff (rate-limited),
the recovery, a broker's refusal, and a session taken over by another client with the same
client id. Nothing that escapes a message handler stops the network thread: it is logged
with the message's identity, counted, and the loop goes on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ._paho_errors import error_for_code, mapped_errors
from ._settings import MqttSettings
from .errors import MqttBadDataError, MqttTransportError

__all__ = ["Inbound", "InboundHandler", "MessageHandler", "MqttConnection", "Received"]

log = logging.getLogger("fogline.messaging")
# A library's logger: an application that configures logging sees these lines; one that
# does not gets no stray output from Python's last-resort handler (its own errors say why
# a connection failed).
log.addHandler(logging.NullHandler())

# MQTT 5 DISCONNECT reason "Session taken over": another client connected with our id.
_SESSION_TAKEN_OVER = 142
# With MQTT 3.1.1 a takeover has no reason code; it shows as connections the broker closes
# again and again within seconds of being made.
_FLAP_LIFETIME_S = 10.0
_FLAP_WINDOW_S = 60.0
_FLAP_COUNT = 3


MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class Inbound:
    """Delivery details of a message received with manual acknowledgements: pass it to
    :meth:`MqttConnection.ack` once the message is safely handled. ``dup`` is the broker's
    redelivery flag."""

    mid: int
    qos: int
    dup: bool
    generation: int


InboundHandler = Callable[[str, bytes, Inbound], None]


@dataclass(frozen=True, slots=True)
class Received:
    """A received message with its MQTT 5 properties, for ``on_received``.

    ``expiry_s`` is the message expiry interval the broker forwarded (what is left of it),
    ``user_properties`` the publisher's name/value pairs in order. Over MQTT 3.1.1 neither
    exists: ``expiry_s`` is ``None`` and ``user_properties`` empty. ``inbound`` is set when
    acknowledgements are manual (``manual_ack=True``).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    inbound: Inbound | None = None


ReceivedHandler = Callable[[Received], None]


class _Client(mqtt.Client):
    """paho's client, run by our own network thread, with writes made by the thread that
    sends.

    In paho's threaded mode (``loop_start``) every outgoing packet goes through the
    network thread: a byte through a socket pair wakes it, and it writes. Under load that
    wake-up, with the thread switch and the GIL hand-over it costs, is paid for every
    message, on both sides of every hop. Here the network thread runs ``loop_forever``
    itself, so paho takes its single-threaded path: the thread that publishes or
    acknowledges writes the packet at once. A lock keeps two writers from interleaving
    the bytes of their packets. Whatever cannot be written at once (a full socket buffer,
    or the network thread busy in a callback) stays in paho's queue, and the network
    thread is woken to write it. Errors found by such a write are left to the network
    thread, which sees the broken connection on its next pass and reconnects.

    Over TLS the client keeps paho's threaded mode: an SSL connection must not be read
    and written by two threads at once, and locking reads as well would order paho's own
    locks against ours.

    This relies on how paho 2.x behaves when no ``loop_start`` thread exists (``publish``
    writes in the caller's thread) and on a few of its internals (``_packet_write``,
    ``_call_socket_register_write``, ``_sock``, ``_sockpairR``/``_sockpairW``,
    ``_thread_terminate``), which is why ``paho-mqtt`` is pinned below 3 and the tests
    cover partial writes, concurrent publishers and reconnects.
    """

    def __init__(self, *args: Any, direct_writes: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._io_lock = threading.RLock()
        self._direct = direct_writes
        self._net_thread: threading.Thread | None = None
        self._net_ident: int | None = None
        self._wake_w: socket.socket | None = None
        self.last_connect_error: OSError | None = None
        self.loop_restarts = 0
        # Whether a message may wait queued behind a full in-flight window (see
        # _update_inflight); guarded by paho's _out_message_mutex.
        self._window_filled = False

    def start_network_thread(self, name: str) -> None:
        if not self._direct:
            self.loop_start()
            return
        if self._net_thread is not None and self._net_thread.is_alive():
            return
        if self._wake_w is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            # paho selects on (and drains) the read end; with no write end of its own it
            # sends no byte per packet.
            self._sockpairR = r
            self._sockpairW = None
            self._wake_w = w
        self._thread_terminate = False
        thread = threading.Thread(target=self._network_main, name=name, daemon=True)
        self._net_thread = thread
        thread.start()

    def stop_network_thread(self, timeout_s: float = 10.0) -> None:
        if not self._direct:
            self.loop_stop()
            return
        self._thread_terminate = True
        self._wake()
        thread = self._net_thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout_s)
        if not thread.is_alive():
            for end in (self._wake_w, self._sockpairR):
                if end is not None:
                    end.close()
            self._wake_w = self._sockpairR = None

    def _network_main(self) -> None:
        self._net_ident = threading.get_ident()
        self._supervised_loop()

    def _thread_main(self) -> None:
        # paho's own network thread (threaded mode, used over TLS) runs the same supervisor.
        try:
            self._supervised_loop()
        finally:
            self._thread = None

    def _supervised_loop(self) -> None:
        # The network thread carries every message of the process: if anything escapes
        # paho's loop (a callback bug, an internal error), it is logged and counted and the
        # loop is entered again, rather than leaving a process that looks connected and
        # receives nothing.
        while True:
            try:
                self.loop_forever(retry_first_connection=True)
                return
            except Exception:  # the network thread's supervisor
                self.loop_restarts += 1
                log.exception(
                    "MQTT network loop of %s failed; restarting it", self._client_id.decode()
                )
                if self._thread_terminate:
                    return
                time.sleep(1.0)

    def reconnect(self) -> MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise
        self.last_connect_error = None
        return rc

    # paho looks for messages queued behind a full in-flight window by walking every
    # outgoing message on each PUBACK: O(messages in flight) per acknowledgement, so a
    # burst costs the square of its size. It was the network thread's largest single cost
    # under load (a worker answering 1,000 items/s). Only ``publish`` queues a message,
    # and only while the window is full (paho 2.x puts the messages a reconnect re-sends
    # in the "publish" state, not the queued one), so the walk is skipped until the
    # window has been full.

    def publish(self, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        with self._out_message_mutex:
            info = super().publish(*args, **kwargs)
            if 0 < self._max_inflight_messages <= self._inflight_messages:
                self._window_filled = True
        return info

    def _update_inflight(self) -> MQTTErrorCode:
        # paho calls this with _out_message_mutex held
        if not self._window_filled:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        rc: MQTTErrorCode = super()._update_inflight()
        self._window_filled = any(
            m.state == mqtt.mqtt_ms_queued for m in self._out_messages.values()
        )
        return rc

    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):  # a full pair is awake already
                w.send(b"\0")

    def loop_write(self) -> MQTTErrorCode:
        if not self._direct or threading.get_ident() == self._net_ident:
            with self._io_lock:
                return super().loop_write()
        with self._io_lock:
            rc = mqtt.MQTT_ERR_SUCCESS if self._sock is None else self._packet_write()
            pending = self.want_write()
        if pending or rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._wake()
        return mqtt.MQTT_ERR_SUCCESS

    def _call_socket_register_write(self) -> None:
        # paho calls this when a packet waits to be written; from another thread, that
        # means the network thread must write it.
        if self._direct and threading.get_ident() != self._net_ident:
            self._wake()
        super()._call_socket_register_write()


class _RateLimit:
    """At most one log line per key and interval; says how many were held back."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> tuple[bool, int]:
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        self._last[key] = now
        return True, self._held.pop(key, 0)


def _held_note(held: int) -> str:
    return f" ({held} similar lines held back)" if held else ""


class MqttConnection:
    """One paho client with reconnects, ``TCP_NODELAY`` and re-subscription after reconnect.

    ``on_message(topic, payload)`` runs on paho's network thread; keep it short. With
    ``on_inbound`` instead, acknowledgements are manual: the broker gets the PUBACK only
    when :meth:`ack` is called, so a message still being processed when the process dies
    counts as undelivered.
    """

    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageHandler | None = None,
        subscriptions: tuple[tuple[str, int], ...] = (),
        *,
        on_inbound: InboundHandler | None = None,
        on_received: ReceivedHandler | None = None,
        manual_ack: bool = False,
    ) -> None:
        if sum(h is not None for h in (on_message, on_inbound, on_received)) > 1:
            raise ValueError("give one of on_message, on_inbound or on_received")
        self.settings = settings
        self._on_message = on_message
        self._on_inbound = on_inbound
        self._on_received = on_received
        self._manual_ack = on_inbound is not None or (on_received is not None and manual_ack)
        self._generation = 0
        self.refused: ReasonCode | None = None
        self._subscriptions = list(subscriptions)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._lock = threading.Lock()
        self.connects = 0
        self.disconnects = 0
        #: Messages whose handler raised (logged, acknowledged when manual, then dropped).
        self.handler_errors = 0
        #: Sessions taken over by another client with the same client id (MQTT 5 reason
        #: code, or with 3.1.1 a run of connections closed right after connecting).
        self.takeovers = 0
        self._stopping = False
        self._connected_at: float | None = None
        self._lost_at: float | None = None
        self._failed_attempts = 0
        self._short_lived: deque[float] = deque()
        self._limit = _RateLimit(10.0)
        proto = mqtt.MQTTv5 if settings.protocol == "5" else mqtt.MQTTv311
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": settings.client_id,
            "protocol": proto,
        }
        if proto == mqtt.MQTTv311:
            kwargs["clean_session"] = settings.clean_start
        client = _Client(**kwargs, direct_writes=not settings.tls)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if self._manual_ack:
            client.manual_ack_set(True)
        client.reconnect_delay_set(
            min_delay=max(1, int(settings.reconnect_min_s)),
            max_delay=max(1, int(settings.reconnect_max_s)),
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(
                ca_certs=settings.ca_file,
                certfile=settings.cert_file,
                keyfile=settings.key_file,
                cert_reqs=ssl.CERT_NONE if settings.tls_insecure else ssl.CERT_REQUIRED,
            )
            if settings.tls_insecure:
                client.tls_insecure_set(True)
        client.on_socket_open = self._on_socket_open
        client.on_connect_fail = self._handle_connect_fail
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        self._client = client

    @property
    def client(self) -> mqtt.Client:
        return self._client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def loop_restarts(self) -> int:
        """Times the network loop was entered again after something escaped it."""
        return self._client.loop_restarts

    def start(self, wait: bool = True) -> None:
        """Connect and start the network thread.

        With ``wait``, block until connected and every initial subscription is acknowledged,
        so nothing published after ``start`` returns can miss a subscriber.
        """
        s = self.settings
        self._stopping = False
        with mapped_errors(f"cannot connect to broker {s.host}:{s.port}"):
            if s.protocol == "5":
                self._client.connect_async(
                    s.host, s.port, keepalive=s.keepalive_s, clean_start=s.clean_start
                )
            else:
                self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
            self._client.start_network_thread(f"fogline-mqtt-{s.client_id}")
        if wait and not (
            self._connected.wait(s.connect_timeout_s) and self._subscribed.wait(s.connect_timeout_s)
        ):
            refused = self.refused
            self.stop()
            if refused is not None:
                raise error_for_code(
                    refused, f"broker {s.host}:{s.port} refused the connection: {refused}"
                )
            last = self._client.last_connect_error
            raise MqttTransportError(
                f"no connection to broker {s.host}:{s.port} within {s.connect_timeout_s:g} s"
                + (f": {_describe(last)}" if last is not None else "")
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self) -> None:
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            self._client.stop_network_thread()
            self._connected.clear()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions.append((topic, qos))
        if self._connected.is_set():
            with mapped_errors(f"cannot subscribe to {topic!r}"):
                self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` now and after any reconnect."""
        with self._lock:
            self._subscriptions = [(t, q) for t, q in self._subscriptions if t != topic]
        if self._connected.is_set():
            with mapped_errors(f"cannot unsubscribe from {topic!r}"):
                rc, _mid = self._client.unsubscribe(topic)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise error_for_code(rc, f"cannot unsubscribe from {topic!r}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        expiry_s: int | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message; paho keeps QoS>0 messages across reconnects.

        The returned handle tells whether and when the message was sent
        (``wait_for_publish``, ``is_published``, ``rc``). ``expiry_s`` (the MQTT 5 message
        expiry interval) and ``user_properties`` are sent only over MQTT 5; over 3.1.1 they
        are not sent at all, which is why nothing the system relies on lives in them.
        Invalid arguments raise :class:`MqttBadDataError`.
        """
        if expiry_s is not None and expiry_s < 0:
            raise MqttBadDataError(f"expiry_s must not be negative, got {expiry_s}")
        props: Properties | None = None
        if self.settings.protocol == "5" and (expiry_s is not None or user_properties):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
            if user_properties:
                props.UserProperty = [(str(k), str(v)) for k, v in user_properties]
        with mapped_errors(f"cannot publish to {topic!r}"):
            return self._client.publish(topic, payload, qos=qos, properties=props)

    def ack(self, inbound: Inbound) -> bool:
        """Acknowledge a message received through ``on_inbound``. A message from before
        the last reconnect is not acknowledged (its packet id may name another message
        now; the broker redelivers it instead). Returns whether the PUBACK was queued."""
        if inbound.qos == 0 or inbound.generation != self._generation:
            return False
        if not self._connected.is_set():
            return False
        with mapped_errors("cannot acknowledge a message"):
            rc = self._client.ack(inbound.mid, inbound.qos)
        return rc == mqtt.MQTT_ERR_SUCCESS

    # paho callbacks (network thread)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Called once the TCP connection exists, before CONNECT is sent. An SSLSocket is a
        # socket subclass, so the option reaches the TCP layer either way.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        now = time.monotonic()
        if reason.is_failure:
            self.refused = reason
            self._failed_attempts += 1
            ok, held = self._limit.allow("refused", now)
            if ok:
                log.error(
                    "broker %s refused the connection of %r: %s%s",
                    self._where(),
                    self.settings.client_id,
                    reason,
                    _held_note(held),
                )
            return
        self.refused = None
        if self._lost_at is not None:
            log.info(
                "reconnected to broker %s after %.1f s (%d failed attempts)",
                self._where(),
                now - self._lost_at,
                self._failed_attempts,
            )
        elif self.connects == 0:
            log.info(
                "connected to broker %s as %r (MQTT %s)",
                self._where(),
                self.settings.client_id,
                self.settings.protocol,
            )
        self._lost_at = None
        self._failed_attempts = 0
        self._connected_at = now
        self.connects += 1
        self._generation += 1
        with self._lock:
            subs = list(self._subscriptions)
            self._pending_subs.clear()
            if not subs:
                self._subscribed.set()
            for topic, qos in subs:
                _rc, mid = client.subscribe(topic, qos)
                if mid is not None:
                    self._pending_subs.add(mid)
        self._connected.set()

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        with self._lock:
            self._pending_subs.discard(mid)
            if not self._pending_subs:
                self._subscribed.set()

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        self._failed_attempts += 1
        err = self._client.last_connect_error
        what = _describe(err) if err is not None else "connection failed"
        if isinstance(err, ssl.SSLCertVerificationError):
            ok, held = self._limit.allow("verify", now)
            if ok:
                log.error(
                    "cannot verify the certificate of broker %s: %s; check ca_file and the "
                    "broker's certificate%s",
                    self._where(),
                    what,
                    _held_note(held),
                )
            return
        ok, held = self._limit.allow("connect_fail", now)
        if ok:
            log.warning(
                "cannot reach broker %s (attempt %d): %s; next attempt in %d s%s",
                self._where(),
                self._failed_attempts,
                what,
                self._next_delay_s(),
                _held_note(held),
            )

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self.disconnects += 1
        self._connected.clear()
        self._subscribed.clear()
        if self._stopping or not was_connected:
            return
        now = time.monotonic()
        self._lost_at = now
        lived_s = now - self._connected_at if self._connected_at is not None else None
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            self.takeovers += 1
            log.warning(
                "broker %s: another client connected with client id %r and took over this "
                "session; every process needs its own client id",
                self._where(),
                self.settings.client_id,
            )
            return
        ok, held = self._limit.allow("lost", now)
        if ok:
            log.warning(
                "lost the connection to broker %s: %s; reconnecting in %d s%s",
                self._where(),
                reason,
                self._next_delay_s(),
                _held_note(held),
            )
        if lived_s is not None and lived_s < _FLAP_LIFETIME_S:
            self._short_lived.append(now)
            while self._short_lived and now - self._short_lived[0] > _FLAP_WINDOW_S:
                self._short_lived.popleft()
            if len(self._short_lived) >= _FLAP_COUNT:
                self.takeovers += 1
                self._short_lived.clear()
                ok, _ = self._limit.allow("flap", now)
                if ok:
                    log.warning(
                        "broker %s closed the connection %d times within %d s, each within "
                        "%d s of connecting: another client is probably using client id %r",
                        self._where(),
                        _FLAP_COUNT,
                        _FLAP_WINDOW_S,
                        _FLAP_LIFETIME_S,
                        self.settings.client_id,
                    )

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _next_delay_s(self) -> int:
        # paho doubles its wait after every failed attempt, from the minimum up to the
        # maximum, and starts again from the minimum after a successful connect.
        s = self.settings
        current = getattr(self._client, "_reconnect_delay", None)
        lo, hi = max(1, int(s.reconnect_min_s)), max(1, int(s.reconnect_max_s))
        return lo if current is None else min(hi, int(current) * 2)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._dispatch(msg)
        except Exception as exc:  # one message must not stop the network thread
            self.handler_errors += 1
            acked = False
            if self._manual_ack and msg.qos > 0:
                # Left unacknowledged, the message would hold one slot of the broker's
                # in-flight window until the next reconnect, and then come back: a handful
                # of such messages would stop delivery altogether.
                with contextlib.suppress(Exception):
                    acked = self._client.ack(msg.mid, msg.qos) == mqtt.MQTT_ERR_SUCCESS
            ok, held = self._limit.allow("handler", time.monotonic())
            if ok:
                log.error(  # noqa: TRY400 - the traceback is chosen by exc_info below
                    "the handler failed on a message on %r (mid %d, qos %d, %d bytes)%s: "
                    "%s: %.200s%s",
                    msg.topic,
                    msg.mid,
                    msg.qos,
                    len(msg.payload),
                    "; acknowledged and dropped" if acked else "; dropped",
                    type(exc).__name__,
                    exc,
                    _held_note(held),
                    # A RecursionError's traceback is thousands of frames: the type and
                    # message say enough.
                    exc_info=not isinstance(exc, RecursionError),
                )

    def _dispatch(self, msg: mqtt.MQTTMessage) -> None:
        if self._on_received is not None:
            props = getattr(msg, "properties", None)
            expiry = getattr(props, "MessageExpiryInterval", None) if props else None
            users = getattr(props, "UserProperty", None) if props else None
            self._on_received(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    msg.qos,
                    bool(msg.retain),
                    None if expiry is None else int(expiry),
                    tuple((str(k), str(v)) for k, v in users or ()),
                    Inbound(msg.mid, msg.qos, bool(msg.dup), self._generation)
                    if self._manual_ack
                    else None,
                )
            )
        elif self._on_inbound is not None:
            inbound = Inbound(msg.mid, msg.qos, bool(msg.dup), self._generation)
            self._on_inbound(msg.topic, bytes(msg.payload), inbound)
        elif self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return (
        text
        if isinstance(exc, OSError) and text != type(exc).__name__
        else (f"{type(exc).__name__}: {text}")
    )
