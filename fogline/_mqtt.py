"""Shared paho-mqtt plumbing for the edge agent and the cloud worker.

Both sides need the same things from a connection: a per-site client id, TLS and
username/password options, MQTT 3.1.1 or 5, automatic reconnects with backoff, and
``TCP_NODELAY`` on the socket (paho leaves Nagle's algorithm on, which adds tens of
milliseconds to every request/reply round trip). Topic names live here too so both
sides agree on them.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "Inbound",
    "MqttConnection",
    "MqttError",
    "MqttSettings",
    "Topics",
    "parse_broker_url",
]

DEFAULT_TOPIC_PREFIX = "fogline/v1"


class MqttError(Exception):
    """A connection to the broker could not be made or used."""


def _check_segment(value: str, what: str) -> None:
    if not value or any(ch in value for ch in "/+#\x00"):
        raise ValueError(f"{what} {value!r} must be non-empty and contain no '/', '+', '#' or NUL")


@dataclass(frozen=True)
class Topics:
    """The topic scheme: ``<prefix>/<site>/features`` and ``<prefix>/<site>/results``."""

    prefix: str = DEFAULT_TOPIC_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.endswith("/") or any(c in self.prefix for c in "+#"):
            raise ValueError(f"topic prefix {self.prefix!r} must be non-empty, no wildcards")

    def features(self, site: str) -> str:
        _check_segment(site, "site")
        return f"{self.prefix}/{site}/features"

    def results(self, site: str) -> str:
        _check_segment(site, "site")
        return f"{self.prefix}/{site}/results"

    def all_features(self, share_group: str | None = None) -> str:
        """Subscription filter for every site's features, shared when a group is given."""
        topic = f"{self.prefix}/+/features"
        if share_group:
            _check_segment(share_group, "share group")
            return f"$share/{share_group}/{topic}"
        return topic

    def site_of(self, topic: str) -> str:
        """The site segment of a features or results topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        rest = topic[len(head) :].split("/")
        if len(rest) != 2 or not rest[0]:
            raise ValueError(f"topic {topic!r} does not name a site")
        return rest[0]


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    connect_timeout_s: float = 10.0
    clean_start: bool = True
    topic_prefix: str = DEFAULT_TOPIC_PREFIX

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"MQTT port {self.port} is out of range 1..65535")
        if self.protocol not in ("3.1.1", "5"):
            raise ValueError(f"MQTT protocol {self.protocol!r} must be '3.1.1' or '5'")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                "reconnect backoff must satisfy 0 < reconnect_min_s <= reconnect_max_s"
            )
        if self.keepalive_s < 1:
            raise ValueError("keepalive_s must be at least 1")
        Topics(self.topic_prefix)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def with_client_id(self, client_id: str) -> MqttSettings:
        return _replace(self, client_id=client_id)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttSettings:
        return cls(**{**parse_broker_url(url), **overrides})


def _replace(settings: MqttSettings, **changes: Any) -> MqttSettings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def parse_broker_url(url: str) -> dict[str, Any]:
    """``mqtt://user:pass@host:port`` or ``mqtts://…`` into :class:`MqttSettings` fields."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ValueError(f"broker URL {url!r} names no host")
    tls = parsed.scheme in ("mqtts", "ssl")
    out: dict[str, Any] = {
        "host": parsed.hostname,
        "port": parsed.port or (8883 if tls else 1883),
        "tls": tls,
    }
    if parsed.username:
        out["username"] = urllib.parse.unquote(parsed.username)
    if parsed.password:
        out["password"] = urllib.parse.unquote(parsed.password)
    return out


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
        self.loop_forever(retry_first_connection=True)

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
    ) -> None:
        if on_message is not None and on_inbound is not None:
            raise ValueError("give on_message or on_inbound, not both")
        self.settings = settings
        self._on_message = on_message
        self._on_inbound = on_inbound
        self._generation = 0
        self.refused: ReasonCode | None = None
        self._subscriptions = list(subscriptions)
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._lock = threading.Lock()
        self.connects = 0
        self.disconnects = 0
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
        if on_inbound is not None:
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

    def start(self, wait: bool = True) -> None:
        """Connect and start the network thread.

        With ``wait``, block until connected and every initial subscription is acknowledged,
        so nothing published after ``start`` returns can miss a subscriber.
        """
        s = self.settings
        try:
            if s.protocol == "5":
                self._client.connect_async(
                    s.host, s.port, keepalive=s.keepalive_s, clean_start=s.clean_start
                )
            else:
                self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to broker {s.host}:{s.port}: {exc}") from exc
        self._client.start_network_thread(f"fogline-mqtt-{s.client_id}")
        if wait and not (
            self._connected.wait(s.connect_timeout_s) and self._subscribed.wait(s.connect_timeout_s)
        ):
            refused = self.refused
            self.stop()
            if refused is not None:
                raise MqttError(f"broker {s.host}:{s.port} refused the connection: {refused}")
            raise MqttError(
                f"no connection to broker {s.host}:{s.port} within {s.connect_timeout_s:g} s"
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.stop_network_thread()
            self._connected.clear()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions.append((topic, qos))
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        """Queue a message; paho keeps QoS>0 messages across reconnects."""
        return self._client.publish(topic, payload, qos=qos)

    def ack(self, inbound: Inbound) -> bool:
        """Acknowledge a message received through ``on_inbound``. A message from before
        the last reconnect is not acknowledged (its packet id may name another message
        now; the broker redelivers it instead). Returns whether the PUBACK was queued."""
        if inbound.qos == 0 or inbound.generation != self._generation:
            return False
        if not self._connected.is_set():
            return False
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
        if reason.is_failure:
            self.refused = reason
            return
        self.refused = None
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

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.disconnects += 1
        self._connected.clear()
        self._subscribed.clear()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_inbound is not None:
            inbound = Inbound(msg.mid, msg.qos, bool(msg.dup), self._generation)
            self._on_inbound(msg.topic, bytes(msg.payload), inbound)
        elif self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload))
