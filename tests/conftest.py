"""Shared fixtures: a real Mosquitto broker on a free port, unique topic prefixes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fogline._broker import EmbeddedBroker, free_port

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


@dataclass
class Broker:
    """A broker the test can stop, restart and kill."""

    host: str
    port: int
    kind: str  # "mosquitto" or "embedded"
    workdir: Path
    _proc: subprocess.Popen[bytes] | None = None
    _embedded: EmbeddedBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def supports_shared_subscriptions(self) -> bool:
        return self.kind == "mosquitto"

    def start(self) -> None:
        if self.kind == "embedded":
            self._embedded = EmbeddedBroker(self.host, self.port).start()
            return
        conf_text = MOSQUITTO_CONF.read_text()
        conf_text = re.sub(r"(?m)^listener 1883 127.0.0.1$", f"listener {self.port} {self.host}", conf_text)
        conf_text = re.sub(
            r"(?m)^persistence_location .*$", f"persistence_location {self.workdir}/", conf_text
        )
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(conf_text)
        binary = mosquitto_binary()
        assert binary is not None
        log = (self.workdir / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        else:
            self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_broker(tmp_path: Path) -> Broker:
    kind = "mosquitto" if mosquitto_binary() else "embedded"
    if kind == "embedded" and os.environ.get("FOGLINE_REQUIRE_MOSQUITTO"):
        pytest.fail("FOGLINE_REQUIRE_MOSQUITTO is set but the mosquitto binary is missing")
    broker = Broker(host="127.0.0.1", port=free_port(), kind=kind, workdir=tmp_path)
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh real Mosquitto (embedded amqtt only where Mosquitto is not installed)."""
    b = start_broker(tmp_path)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for a whole test module."""
    b = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"fogline-test/{uuid.uuid4().hex[:12]}"
