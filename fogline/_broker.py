"""An in-process MQTT broker (amqtt) for the one-box demo and for hosts without Mosquitto.

amqtt speaks MQTT 3.1.1 only and does not implement shared subscriptions, so with it a
single cloud worker subscribes to the plain features topic. Production uses Mosquitto
(see ``deploy/mosquitto/``) or another real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import Any

__all__ = ["EmbeddedBroker", "MosquittoProcess", "free_port", "mosquitto_binary"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mqtt-broker", daemon=True
        )
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise RuntimeError(
                "the embedded broker needs the 'broker' extra: pip install 'fogline[broker]'"
            ) from exc
        # amqtt logs every connection at INFO; keep the demo's output readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

        async def _start() -> None:
            self._broker = Broker(config, loop=self._loop)
            await self._broker.start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(
                    timeout_s
                )
            self._broker = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 100000
max_inflight_messages 1000
persistence false
log_type error
connection_messages false
"""


def mosquitto_binary() -> str | None:
    """Path of the Mosquitto broker binary, if installed."""
    import shutil

    found = shutil.which("mosquitto")
    if found:
        return found
    import os

    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


class MosquittoProcess:
    """A private Mosquitto on a free loopback port, for benchmarks (not for production)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self._proc: Any = None
        self._tmp: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> MosquittoProcess:
        import subprocess
        import tempfile
        import time
        from pathlib import Path

        self._tmp = tempfile.TemporaryDirectory(prefix="fogline-mosquitto-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(host=self.host, port=self.port))
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}")

    def stop(self) -> None:
        import subprocess

        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
