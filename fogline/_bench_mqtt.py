"""``fogline bench mqtt``: what the broker layer costs, measured through a real Mosquitto.

Two clients in this process talk through a private Mosquitto (the shipped tuning,
``set_tcp_nodelay true``): a requester publishes at a fixed rate, a responder sends each
message straight back, and the requester times every round trip (client → broker →
client → broker → client, QoS 1). Then one client publishes a burst as fast as it can and
the other counts what arrives. Each is run with fogline's connection (``TCP_NODELAY`` on
each socket, packets written by the publishing thread) and with paho's defaults (Nagle on,
every packet written by paho's network thread), so the figures say what the connection's
two choices buy on this machine.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import typer

__all__ = ["bench_mqtt"]

_HEADER = struct.Struct("<QQ")  # sequence number, send time (perf_counter_ns)
KINDS = ("fogline", "paho-default")


class _Client(Protocol):
    def publish(self, topic: str, payload: bytes) -> Any: ...

    def stop(self) -> None: ...


class _FoglineClient:
    def __init__(
        self, host: str, port: int, name: str, topic: str | None, on: Callable[[bytes], None]
    ) -> None:
        from fogline.messaging import MqttConnection, MqttSettings

        settings = MqttSettings(host=host, port=port, client_id=name)
        subs = ((topic, 1),) if topic else ()
        self._conn = MqttConnection(settings, lambda _t, p: on(p), subs)
        self._conn.start()

    def publish(self, topic: str, payload: bytes) -> Any:
        return self._conn.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._conn.stop()


class _PahoClient:
    """paho-mqtt as its documentation shows it: ``loop_start`` and nothing else."""

    def __init__(
        self, host: str, port: int, name: str, topic: str | None, on: Callable[[bytes], None]
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        ready = threading.Event()

        def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            if topic:
                c.subscribe(topic, 1)
            else:
                ready.set()

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: ready.set()
        client.on_message = lambda c, u, msg: on(bytes(msg.payload))
        client.connect(host, port)
        client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("paho client did not connect")
        self._client = client

    def publish(self, topic: str, payload: bytes) -> Any:
        return self._client.publish(topic, payload, qos=1)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _client(
    kind: str, host: str, port: int, name: str, topic: str | None, on: Callable[[bytes], None]
) -> _Client:
    if kind == "fogline":
        return _FoglineClient(host, port, name, topic, on)
    return _PahoClient(host, port, name, topic, on)


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    ordered = sorted(values_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": round(at(0.50), 3),
        "p90": round(at(0.90), 3),
        "p99": round(at(0.99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def _round_trips(
    kind: str, host: str, port: int, rate: float, seconds: float, payload: int
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    req, rep = f"bench/{run}/req", f"bench/{run}/rep"
    n = max(1, int(rate * seconds))
    latencies: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def on_reply(body: bytes) -> None:
        _seq, sent = _HEADER.unpack_from(body)
        with lock:
            latencies.append((time.perf_counter_ns() - sent) / 1e6)
            if len(latencies) >= n:
                done.set()

    holder: list[_Client] = []
    responder = _client(
        kind, host, port, f"rsp-{run}", req, lambda body: holder[0].publish(rep, body)
    )
    holder.append(responder)
    requester = _client(kind, host, port, f"req-{run}", rep, on_reply)
    pad = b"\0" * max(0, payload - _HEADER.size)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            requester.publish(req, _HEADER.pack(i, time.perf_counter_ns()) + pad)
        done.wait(max(10.0, seconds))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        requester.stop()
        responder.stop()
    with lock:
        got = list(latencies)
    return {
        "offered": n,
        "answered": len(got),
        "offered_per_s": rate,
        "latency_ms": _percentiles(got),
        # Both clients live in this process: this is the client side of two hops each way.
        "client_cpu_us_per_round_trip": round(cpu / max(1, len(got)) * 1e6, 1),
        "wall_s": round(wall, 3),
    }


def _burst(kind: str, host: str, port: int, count: int, payload: int) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    topic = f"bench/{run}/burst"
    received = 0
    last = [0.0]
    done = threading.Event()
    lock = threading.Lock()

    def on_message(body: bytes) -> None:
        nonlocal received
        with lock:
            received += 1
            if received >= count:
                last[0] = time.perf_counter()
                done.set()

    sub = _client(kind, host, port, f"sub-{run}", topic, on_message)
    pub = _client(kind, host, port, f"pub-{run}", None, lambda body: None)
    body = b"\1" * payload
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            info = pub.publish(topic, body)
        info.wait_for_publish(30)
        done.wait(30)
        cpu = time.process_time() - cpu0
    finally:
        pub.stop()
        sub.stop()
    elapsed = (last[0] or time.perf_counter()) - t0
    return {
        "messages": count,
        "received": received,
        "payload_bytes": payload,
        "messages_per_s": round(received / elapsed) if elapsed > 0 else None,
        "client_cpu_us_per_message": round(cpu / max(1, received) * 1e6, 1),
    }


@contextlib.contextmanager
def _broker(url: str | None) -> Iterator[tuple[str, int]]:
    if url:
        from fogline.messaging import parse_broker_url

        fields = parse_broker_url(url)
        yield str(fields["host"]), int(fields["port"])
        return
    from fogline._broker import MosquittoProcess, mosquitto_binary

    if not mosquitto_binary():
        raise typer.BadParameter("needs mosquitto installed, or --broker URL")
    with MosquittoProcess() as mosq:
        yield mosq.host, mosq.port


def bench_mqtt(
    rate: float = typer.Option(1000.0, min=1.0, help="Round trips offered per second."),
    seconds: float = typer.Option(3.0, min=0.5, help="How long to offer round trips."),
    payload: int = typer.Option(150, min=16, help="Round-trip message size in bytes."),
    burst: int = typer.Option(20_000, min=100, help="Messages in the throughput burst."),
    burst_payload: int = typer.Option(600, min=1, help="Burst message size in bytes."),
    kinds: str = typer.Option(
        ",".join(KINDS),
        "--kinds",
        help="Clients to measure, comma-separated: fogline, paho-default.",
    ),
    broker: str | None = typer.Option(None, help="Broker URL; default: a private Mosquitto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """MQTT round-trip latency at a fixed rate and QoS 1 throughput, fogline's connection
    against paho's defaults, through a real Mosquitto."""
    from fogline._bench import _emit

    kind = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = sorted(set(kind) - set(KINDS))
    if unknown or not kind:
        raise typer.BadParameter(f"--kinds takes {', '.join(KINDS)}; got {kinds!r}")
    result: dict[str, Any] = {"cpus": os.cpu_count(), "broker": broker or "private mosquitto"}
    with _broker(broker) as (host, port):
        for k in kind:
            result[k] = {
                "round_trip": _round_trips(k, host, port, rate, seconds, payload),
                "burst": _burst(k, host, port, burst, burst_payload),
            }
    _emit(result, as_json, "MQTT through Mosquitto")
