"""The shipped production Mosquitto config, run for real: per-site ACLs, passwords, TLS,
queue limits and persistence, exercised with fogline's own MQTT client.

Every broker here starts from ``deploy/mosquitto/mosquitto.conf`` and ``fogline.acl`` as
shipped; only listener ports and addresses, file paths and the run-as user are rewritten
(``render_mosquitto_conf`` in conftest); the mutual-TLS test also turns on the two options
the config documents for it. Certificates come from the shipped
``make-dev-certs.py``, accounts from ``mosquitto_passwd``, as docs/broker.md tells operators.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from fogline._broker import MOSQUITTO_CONF as BENCH_MOSQUITTO_CONF
from fogline._broker import MosquittoProcess, free_port
from fogline._mqtt import MqttConnection, MqttSettings, Topics
from fogline.messaging import MqttTransportError
from tests.conftest import (
    MOSQUITTO_CONF,
    MOSQUITTO_DIR,
    MOSQUITTO_PRODUCTION_CONF,
    Broker,
    publish_from_threads,
    render_mosquitto_conf,
    require_mosquitto,
)

pytestmark = pytest.mark.integration

ACL_FILE = MOSQUITTO_DIR / "fogline.acl"
CERT_SCRIPT = MOSQUITTO_DIR / "make-dev-certs.py"
CLOUD = "fogline-cloud"
SITES = ("site-a", "site-b")
TLS_PORT = 8883  # the shipped TLS listener
TOPICS = Topics()
SHARED_FEATURES = TOPICS.all_features(share_group="workers")
WAIT_S = 15.0


# ---------------------------------------------------------------------------
# fixtures: certificates, accounts, a broker from the production config
# ---------------------------------------------------------------------------


def mosquitto_passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        if os.environ.get("FOGLINE_REQUIRE_MOSQUITTO"):
            pytest.fail("FOGLINE_REQUIRE_MOSQUITTO is set but mosquitto_passwd is missing")
        pytest.skip("mosquitto_passwd is not installed")
    return found


def add_account(passwd_file: Path, user: str, password: str) -> None:
    """What docs/broker.md has an operator run: a 0600 file made first, so the hashes are
    never readable by others; the password goes in on stdin, not in argv."""
    if not passwd_file.exists():
        os.close(os.open(passwd_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    subprocess.run(
        [mosquitto_passwd_binary(), str(passwd_file), user],
        input=f"{password}\n{password}\n".encode(),
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert stat.S_IMODE(passwd_file.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev CA, a server certificate for 127.0.0.1/localhost, client certs for both sites."""
    out = tmp_path_factory.mktemp("pki")
    clients = [arg for site in SITES for arg in ("--client", site)]
    subprocess.run(
        [sys.executable, str(CERT_SCRIPT), "--out", str(out), *clients],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {user: secrets.token_urlsafe(16) for user in (CLOUD, *SITES)}


@pytest.fixture(scope="module")
def passwd_template(tmp_path_factory: pytest.TempPathFactory, passwords: dict[str, str]) -> Path:
    require_mosquitto()
    path = tmp_path_factory.mktemp("accounts") / "fogline.passwd"
    for user, password in passwords.items():
        add_account(path, user, password)
    return path


def production_broker(workdir: Path, pki: Path, passwd_file: Path, **options: str) -> Broker:
    require_mosquitto()
    return Broker(
        host="127.0.0.1",
        port=free_port(),
        kind="mosquitto",
        workdir=workdir,
        conf_source=MOSQUITTO_PRODUCTION_CONF,
        extra_ports={TLS_PORT: free_port()},
        options={
            "password_file": str(passwd_file),
            "acl_file": str(ACL_FILE),
            "certfile": str(pki / "server.crt"),
            "keyfile": str(pki / "server.key"),
            "cafile": str(pki / "ca.crt"),
            **options,
        },
    )


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Path, passwd_template: Path) -> Iterator[Broker]:
    """Mosquitto from the production config, with its own copy of the password file."""
    passwd_file = tmp_path / "fogline.passwd"
    shutil.copy(passwd_template, passwd_file)
    passwd_file.chmod(0o600)
    b = production_broker(tmp_path, pki, passwd_file)
    b.start()
    try:
        yield b
    finally:
        b.stop()


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------


@dataclass
class Client:
    """fogline's MqttConnection plus a queue of what it received."""

    conn: MqttConnection
    received: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)

    def get(self, timeout_s: float = WAIT_S) -> tuple[str, bytes]:
        return self.received.get(timeout=timeout_s)

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.conn.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        return info


class Clients:
    """Makes connected clients for a broker and stops them all at the end of a test."""

    def __init__(self, broker: Broker, pki: Path, passwords: dict[str, str]) -> None:
        self.broker = broker
        self.pki = pki
        self.passwords = dict(passwords)
        self._open: list[MqttConnection] = []

    def settings(self, user: str | None, *, tls: bool = False, **kw: object) -> MqttSettings:
        base: dict[str, object] = {
            "host": self.broker.host,
            "port": self.broker.port_for(TLS_PORT if tls else 1883),
            "client_id": f"{user or 'certificate'}-{uuid.uuid4().hex[:8]}",
            "connect_timeout_s": WAIT_S,
        }
        if user is not None:
            base |= {"username": user, "password": self.passwords.get(user)}
        if tls:
            base |= {"tls": True, "ca_file": str(self.pki / "ca.crt")}
        return MqttSettings(**{**base, **kw})  # type: ignore[arg-type]

    def connect(
        self,
        settings: MqttSettings,
        subscriptions: tuple[str, ...] = (),
    ) -> Client:
        received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        conn = MqttConnection(
            settings,
            on_message=lambda topic, payload: received.put((topic, payload)),
            subscriptions=tuple((s, 1) for s in subscriptions),
        )
        conn.start()
        self._open.append(conn)
        return Client(conn, received)

    def user(self, name: str, *subscriptions: str, tls: bool = False, **kw: object) -> Client:
        return self.connect(self.settings(name, tls=tls, **kw), subscriptions)

    def close(self) -> None:
        for conn in self._open:
            conn.stop()


@pytest.fixture
def clients(secure_broker: Broker, pki: Path, passwords: dict[str, str]) -> Iterator[Clients]:
    c = Clients(secure_broker, pki, passwords)
    try:
        yield c
    finally:
        c.close()


def connack(
    host: str,
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> ReasonCode:
    """The broker's answer to a CONNECT; plain paho, so refusals are seen as they are."""
    answers: queue.Queue[ReasonCode] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    client.on_connect = lambda c, u, flags, reason, props: answers.put(reason)
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=ca_file)
    client.connect(host, port)
    client.loop_start()
    try:
        return answers.get(timeout=WAIT_S)
    finally:
        client.disconnect()
        client.loop_stop()


def tls_session_refused(
    host: str, port: int, *, ca_file: str, username: str, password: str
) -> bool:
    """True when the broker drops a TLS client before any CONNACK.

    Under TLS 1.3 the client finishes its side of the handshake before the server has
    checked the (missing) client certificate, so the refusal shows up on the first read.
    """
    connacks: list[ReasonCode] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.tls_set(ca_certs=ca_file)
    client.username_pw_set(username, password)
    client.on_connect = lambda c, u, flags, reason, props: connacks.append(reason)
    deadline = time.monotonic() + WAIT_S
    try:
        client.connect(host, port)
        while time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                return not connacks
    except (ssl.SSLError, OSError):
        return not connacks
    finally:
        client.disconnect()
    raise AssertionError(f"the TLS session was still open after {WAIT_S:g} s")


def payloads(messages: list[tuple[str, bytes]]) -> list[bytes]:
    return [payload for _topic, payload in messages]


# ---------------------------------------------------------------------------
# a site and the cloud, each confined to its own topics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
def test_site_publishes_its_features_and_receives_its_results(clients: Clients, tls: bool) -> None:
    cloud = clients.user(CLOUD, SHARED_FEATURES, tls=tls)
    site = clients.user("site-a", TOPICS.results("site-a"), tls=tls)

    site.publish(TOPICS.features("site-a"), b"features-1")
    assert cloud.get() == (TOPICS.features("site-a"), b"features-1")

    cloud.publish(TOPICS.results("site-a"), b"result-1")
    assert site.get() == (TOPICS.results("site-a"), b"result-1")


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
def test_a_site_publishing_from_several_threads_loses_nothing(clients: Clients, tls: bool) -> None:
    # Plain connections are written by the publishing threads, TLS ones by the network
    # thread alone. The cloud answers while the site still publishes, so acknowledgements
    # are read while packets are written.
    cloud = clients.user(CLOUD, SHARED_FEATURES, tls=tls)
    site = clients.user("site-a", TOPICS.results("site-a"), tls=tls)
    echo = threading.Thread(
        target=lambda: [
            cloud.conn.publish(TOPICS.results("site-a"), cloud.get()[1][:64]) for _ in range(40)
        ]
    )
    echo.start()
    sent = publish_from_threads(
        site.conn, TOPICS.features("site-a"), threads=4, each=10, size=64 * 1024
    )
    echo.join(WAIT_S)
    answers = sorted(site.get()[1] for _ in sent)
    assert answers == sorted(body[:64] for body in sent)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_site_cannot_publish_into_another_sites_features(clients: Clients, protocol: str) -> None:
    cloud = clients.user(CLOUD, SHARED_FEATURES)
    site_a = clients.user("site-a", protocol=protocol)
    acks: dict[int, ReasonCode] = {}

    def on_publish(c: mqtt.Client, u: object, mid: int, reason: ReasonCode, props: object) -> None:
        acks[mid] = reason

    site_a.conn.client.on_publish = on_publish

    forged = site_a.publish(TOPICS.features("site-b"), b"forged")
    site_a.publish(TOPICS.features("site-a"), b"own")

    # QoS 1 messages of one publisher reach a subscriber in order: had the forged message
    # been let through, it would have arrived before this one.
    assert cloud.get() == (TOPICS.features("site-a"), b"own")
    assert cloud.drain() == []
    if protocol == "5":
        assert acks[forged.mid].getName() == "Not authorized"


def test_site_reads_neither_other_sites_results_nor_any_features(clients: Clients) -> None:
    cloud = clients.user(CLOUD, SHARED_FEATURES)
    site_a = clients.user(
        "site-a",
        "fogline/v1/#",
        TOPICS.results("site-b"),
        f"$share/snoop/{TOPICS.all_features()}",
    )
    site_b = clients.user("site-b")

    site_b.publish(TOPICS.features("site-b"), b"b-features")
    assert cloud.get() == (TOPICS.features("site-b"), b"b-features")
    cloud.publish(TOPICS.results("site-b"), b"b-result")
    cloud.publish(TOPICS.results("site-a"), b"a-result")

    # Everything above was routed before site A's own result, which does arrive.
    topic, payload = site_a.get()
    assert (topic, payload) == (TOPICS.results("site-a"), b"a-result")
    assert {p for _t, p in site_a.drain()} <= {b"a-result"}


def test_cloud_workers_share_every_sites_features_and_answer_each_site(
    clients: Clients,
) -> None:
    workers = [clients.user(CLOUD, SHARED_FEATURES, tls=True) for _ in range(2)]
    sites = {s: clients.user(s, TOPICS.results(s), tls=True) for s in SITES}
    per_site = 20

    for i in range(per_site):
        for name, site in sites.items():
            site.publish(TOPICS.features(name), f"{name}:{i}".encode())

    got: list[list[tuple[str, bytes]]] = [[] for _ in workers]
    deadline = time.monotonic() + WAIT_S
    while sum(map(len, got)) < per_site * len(sites) and time.monotonic() < deadline:
        for index, worker in enumerate(workers):
            got[index].extend(worker.drain())
        time.sleep(0.01)
    everything = [m for share in got for m in share]
    assert sorted(payloads(everything)) == sorted(
        f"{s}:{i}".encode() for s in SITES for i in range(per_site)
    )
    assert all(share for share in got), "each worker of the group gets a share"

    for worker, share in zip(workers, got, strict=True):
        for topic, payload in share:
            worker.publish(TOPICS.results(TOPICS.site_of(topic)), b"answer:" + payload)
    for name, site in sites.items():
        answers = sorted(site.get()[1] for _ in range(per_site))
        assert answers == sorted(f"answer:{name}:{i}".encode() for i in range(per_site))


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
def test_anonymous_client_is_refused(secure_broker: Broker, pki: Path, tls: bool) -> None:
    reason = connack(
        secure_broker.host,
        secure_broker.port_for(TLS_PORT if tls else 1883),
        ca_file=str(pki / "ca.crt") if tls else None,
    )
    assert reason.is_failure
    assert reason.getName() == "Not authorized"


@pytest.mark.parametrize("user", ["site-a", "no-such-site"])
def test_wrong_password_is_refused(secure_broker: Broker, user: str) -> None:
    reason = connack(
        secure_broker.host,
        secure_broker.port,
        username=user,
        password="not-the-password",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    assert reason.is_failure
    assert reason.getName() == "Not authorized"


def test_site_added_with_mosquitto_passwd_connects_after_a_reload(
    secure_broker: Broker, clients: Clients
) -> None:
    password = secrets.token_urlsafe(16)
    clients.passwords["site-c"] = password
    cloud = clients.user(CLOUD, SHARED_FEATURES)
    add_account(Path(secure_broker.options["password_file"]), "site-c", password)
    secure_broker.reload()

    deadline = time.monotonic() + WAIT_S
    while connack(
        secure_broker.host, secure_broker.port, username="site-c", password=password
    ).is_failure:
        assert time.monotonic() < deadline, "site-c still refused after the reload"
        time.sleep(0.05)
    site_c = clients.user("site-c")
    site_c.publish(TOPICS.features("site-c"), b"hello from c")
    assert cloud.get() == (TOPICS.features("site-c"), b"hello from c")
    assert cloud.conn.is_connected, "a reload keeps existing connections"


def test_site_removed_with_mosquitto_passwd_is_disconnected_at_the_reload(
    secure_broker: Broker, clients: Clients
) -> None:
    site_b = clients.user("site-b")
    cloud = clients.user(CLOUD)
    subprocess.run(
        [mosquitto_passwd_binary(), "-D", secure_broker.options["password_file"], "site-b"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    secure_broker.reload()

    deadline = time.monotonic() + WAIT_S
    while site_b.conn.is_connected:
        assert time.monotonic() < deadline, "site-b is still connected after the reload"
        time.sleep(0.05)
    reason = connack(
        secure_broker.host,
        secure_broker.port,
        username="site-b",
        password=clients.passwords["site-b"],
    )
    assert reason.getName() == "Not authorized"
    assert cloud.conn.is_connected


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


def test_client_without_the_ca_cannot_verify_the_broker(secure_broker: Broker) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.tls_set()  # the system's CAs, which never signed the broker's certificate
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client.connect(secure_broker.host, secure_broker.port_for(TLS_PORT))


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA of someone else's: it signed nothing the broker presents."""
    out = tmp_path_factory.mktemp("foreign-pki")
    subprocess.run(
        [sys.executable, str(CERT_SCRIPT), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out / "ca.crt"


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_attack_fogline_connection_refuses_a_broker_it_cannot_verify(
    clients: Clients, foreign_ca: Path, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker a site is pointed at presents a certificate its CA never signed (an
    # impostor, or a wrong ca_file): fogline's own connection must not talk to it at all.
    caplog.set_level(logging.INFO, logger="fogline.messaging")
    settings = clients.settings(
        "site-a", tls=True, ca_file=str(foreign_ca), protocol=protocol, connect_timeout_s=3.0
    )
    conn = MqttConnection(settings)
    with pytest.raises(MqttTransportError, match="certificate verify failed"):
        conn.start()
    assert conn.connects == 0
    assert not conn.is_connected
    (record,) = [r for r in caplog.records if "cannot verify the certificate" in r.getMessage()]
    assert record.levelno == logging.ERROR
    # The same settings with the right CA connect: what failed was the verification.
    right = clients.connect(clients.settings("site-a", tls=True, protocol=protocol))
    assert right.conn.is_connected


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_listener_speaks_tls_1_2_and_1_3_and_refuses_older(
    secure_broker: Broker, pki: Path
) -> None:
    def handshake(version: ssl.TLSVersion) -> str | None:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what it is asked to
        port = secure_broker.port_for(TLS_PORT)
        with (
            socket.create_connection((secure_broker.host, port), timeout=WAIT_S) as raw,
            ctx.wrap_socket(raw, server_hostname=secure_broker.host) as tls,
        ):
            return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|NO_PROTOCOLS|UNSUPPORTED"):
        handshake(ssl.TLSVersion.TLSv1_1)


def test_mutual_tls_takes_the_site_from_the_client_certificate(
    tmp_path: Path, pki: Path, passwd_template: Path, passwords: dict[str, str]
) -> None:
    # The documented switch: require_certificate true, use_identity_as_username uncommented.
    broker = production_broker(
        tmp_path,
        pki,
        passwd_template,
        require_certificate="true",
        use_identity_as_username="true",
    )
    broker.start()
    c = Clients(broker, pki, passwords)
    try:
        cloud = c.user(CLOUD, SHARED_FEATURES)  # loopback: still by password
        site_a = c.connect(
            c.settings(
                None,
                tls=True,
                cert_file=str(pki / "site-a.crt"),
                key_file=str(pki / "site-a.key"),
            ),
            (TOPICS.results("site-a"),),
        )
        site_a.publish(TOPICS.features("site-b"), b"forged")
        site_a.publish(TOPICS.features("site-a"), b"own")
        assert cloud.get() == (TOPICS.features("site-a"), b"own")
        cloud.publish(TOPICS.results("site-a"), b"result")
        assert site_a.get() == (TOPICS.results("site-a"), b"result")
        assert cloud.drain() == []

        # Without a client certificate the broker ends the TLS session, password or not.
        assert tls_session_refused(
            broker.host,
            broker.port_for(TLS_PORT),
            ca_file=str(pki / "ca.crt"),
            username="site-a",
            password=passwords["site-a"],
        )
    finally:
        c.close()
        broker.stop()


# ---------------------------------------------------------------------------
# queue limits and persistence
# ---------------------------------------------------------------------------


def offline_worker_settings(clients: Clients) -> MqttSettings:
    return clients.settings(CLOUD, client_id=f"worker-{uuid.uuid4().hex[:8]}", clean_start=False)


def publish_burst(site: Client, count: int) -> None:
    infos = [
        site.conn.publish(TOPICS.features("site-a"), f"{i:06d}".encode() + bytes(300), qos=1)
        for i in range(count)
    ]
    for info in infos:
        info.wait_for_publish(WAIT_S)
    assert all(info.is_published() for info in infos)


def receive(client: Client, count: int) -> list[bytes]:
    """Up to ``count`` payloads; gives up once nothing more has come for a while."""
    got: list[bytes] = []
    while len(got) < count:
        try:
            got.append(client.get(timeout_s=5.0)[1])
        except queue.Empty:
            break
    return got


def test_qos1_burst_to_an_offline_worker_is_delivered_in_full_when_it_returns(
    clients: Clients,
) -> None:
    # 5,000 is five times Mosquitto's default max_queued_messages of 1,000.
    burst = 5000
    settings = offline_worker_settings(clients)
    clients.connect(settings, (SHARED_FEATURES,)).conn.stop()
    site = clients.user("site-a")

    publish_burst(site, burst)

    worker = clients.connect(settings, (SHARED_FEATURES,))
    got = receive(worker, burst)
    assert len(got) == burst
    assert {p[:6] for p in got} == {f"{i:06d}".encode() for i in range(burst)}


def test_queued_messages_survive_a_broker_restart(secure_broker: Broker, clients: Clients) -> None:
    count = 2000
    settings = offline_worker_settings(clients)
    clients.connect(settings, (SHARED_FEATURES,)).conn.stop()
    site = clients.user("site-a")
    publish_burst(site, count)
    site.conn.stop()

    secure_broker.restart()  # SIGTERM: Mosquitto writes its database, then starts from it

    worker = clients.connect(settings, (SHARED_FEATURES,))
    got = receive(worker, count)
    assert len(got) == count
    assert {p[:6] for p in got} == {f"{i:06d}".encode() for i in range(count)}


def test_shared_subscription_parks_an_offline_workers_share_until_it_returns(
    clients: Clients,
) -> None:
    # Mosquitto deals shared messages to offline persistent members too (docs/broker.md,
    # "Shared subscriptions and worker sessions"): nothing is lost, but it waits.
    count = 20
    settings = offline_worker_settings(clients)
    clients.connect(settings, (SHARED_FEATURES,)).conn.stop()
    online = clients.user(CLOUD, SHARED_FEATURES)
    site = clients.user("site-a")

    publish_burst(site, count)  # each message's member is chosen here, at publish time
    returning = clients.connect(settings, (SHARED_FEATURES,))

    live: list[bytes] = []
    parked: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while len(live) + len(parked) < count and time.monotonic() < deadline:
        live += payloads(online.drain())
        parked += payloads(returning.drain())
        time.sleep(0.01)
    assert live, "the online worker got its share"
    assert parked, "the offline worker's share waited for it"
    assert sorted(p[:6] for p in live + parked) == [f"{i:06d}".encode() for i in range(count)]


def test_private_broker_with_persistence_keeps_queued_messages_across_a_restart() -> None:
    require_mosquitto()
    with MosquittoProcess(persistence=True) as mosq:
        settings = MqttSettings(
            host=mosq.host, port=mosq.port, client_id="bench-worker", clean_start=False
        )
        worker = MqttConnection(settings, subscriptions=(("bench/#", 1),))
        worker.start()
        worker.stop()
        sender = MqttConnection(MqttSettings(host=mosq.host, port=mosq.port))
        sender.start()
        infos = [sender.publish("bench/x", str(i).encode()) for i in range(1500)]
        for info in infos:
            info.wait_for_publish(WAIT_S)
        sender.stop()

        mosq.restart()

        received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        worker = MqttConnection(
            settings,
            on_message=lambda t, p: received.put((t, p)),
            subscriptions=(("bench/#", 1),),
        )
        worker.start()
        try:
            got = receive(Client(worker, received), 1500)
        finally:
            worker.stop()
    assert sorted(int(p) for p in got) == list(range(1500))


# ---------------------------------------------------------------------------
# the shipped files agree with each other and with the topic scheme
# ---------------------------------------------------------------------------

TUNING = (
    "set_tcp_nodelay",
    "max_queued_messages",
    "max_queued_bytes",
    "max_inflight_messages",
    "max_packet_size",
    "persistence",
    "autosave_interval",
    "persistent_client_expiration",
)


def conf_values(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            values.setdefault(name, []).append(value.strip())
    return values


def test_one_box_config_has_the_production_tuning() -> None:
    production = conf_values(MOSQUITTO_PRODUCTION_CONF.read_text())
    local = conf_values(MOSQUITTO_CONF.read_text())
    assert {k: local.get(k) for k in TUNING} == {k: production.get(k) for k in TUNING}
    assert int(production["max_queued_messages"][0]) >= 100_000


def test_benchmark_broker_has_the_production_queue_limits() -> None:
    production = conf_values(MOSQUITTO_PRODUCTION_CONF.read_text())
    bench = conf_values(BENCH_MOSQUITTO_CONF)
    keys = ("set_tcp_nodelay", "max_queued_messages", "max_queued_bytes", "max_inflight_messages")
    assert {k: bench.get(k) for k in keys} == {k: production.get(k) for k in keys}


def test_production_config_refuses_anonymous_clients_on_every_listener() -> None:
    production = conf_values(MOSQUITTO_PRODUCTION_CONF.read_text())
    assert production["per_listener_settings"] == ["false"]
    assert production["allow_anonymous"] == ["false"]
    assert production["tls_version"] == ["tlsv1.2"]
    assert set(production["listener"]) == {"1883 127.0.0.1", "8883"}


def test_acl_grants_exactly_the_topic_scheme() -> None:
    rules: dict[str, set[str]] = {}
    section = "pattern"
    for line in ACL_FILE.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            section = words[1]
        elif words[0] == "topic":
            rules.setdefault(section, set()).add(f"{words[1]} {words[2]}")
        elif words[0] == "pattern":
            rules.setdefault("pattern", set()).add(f"{words[1]} {words[2]}")
    assert rules == {
        CLOUD: {
            f"read {TOPICS.all_features()}",
            f"write {TOPICS.results('site').replace('/site/', '/+/')}",
        },
        "pattern": {f"write {TOPICS.features('%u')}", f"read {TOPICS.results('%u')}"},
    }


def test_rendering_a_config_rejects_an_option_the_file_lacks() -> None:
    text = MOSQUITTO_PRODUCTION_CONF.read_text()
    with pytest.raises(ValueError, match="no listener 9999, cafile_typo"):
        render_mosquitto_conf(
            text, host="127.0.0.1", ports={9999: 1}, options={"cafile_typo": "/x"}
        )
    rendered = render_mosquitto_conf(
        text, host="127.0.0.1", ports={8883: 4242}, options={"use_identity_as_username": "true"}
    )
    assert "listener 4242 127.0.0.1" in rendered.splitlines()
    assert "use_identity_as_username true" in rendered.splitlines()


# ---------------------------------------------------------------------------
# the dev certificate script
# ---------------------------------------------------------------------------


def test_dev_cert_script_adds_a_site_with_the_same_ca_and_0600_keys(
    pki: Path, tmp_path: Path
) -> None:
    out = tmp_path / "certs"
    shutil.copytree(pki, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    subprocess.run(
        [sys.executable, str(CERT_SCRIPT), "--out", str(out), "--client", "site-c"],
        check=True,
        capture_output=True,
        timeout=60,
    )

    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "site-a.crt"):
        assert (out / name).read_bytes() == before[name], f"{name} was rewritten"
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
    ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    ctx.load_cert_chain(str(out / "site-c.crt"), str(out / "site-c.key"))


@pytest.mark.parametrize("bad", ["../evil", "site/a", "ca", ""])
def test_dev_cert_script_refuses_a_client_name_that_is_not_a_site_id(
    tmp_path: Path, bad: str
) -> None:
    proc = subprocess.run(
        [sys.executable, str(CERT_SCRIPT), "--out", str(tmp_path), "--client", bad],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert re.search(r"--client .* must be a site id", proc.stderr)
    assert not list(tmp_path.iterdir()), "nothing is written for a bad request"
