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


# The tuning of deploy/mosquitto/mosquitto.conf (a test keeps them equal; the comments
# there say why), for a private broker without accounts. deploy/ is not installed with
# the package, hence the copy.
MOSQUITTO_CONF = """\
per_listener_settings false
allow_anonymous true
listener {port} {host}
set_tcp_nodelay true
max_queued_messages 100000
max_queued_bytes 134217728
max_inflight_messages 1000
max_packet_size 16777216
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
    """A private Mosquitto on a free loopback port, for benchmarks (not for production).

    With ``persistence``, sessions and queued messages are kept in the process's working
    directory across :meth:`restart` and :meth:`kill`/:meth:`start`, as a production broker
    keeps them across restarts; :meth:`stop` ends the process and removes the directory.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, persistence: bool = False
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        self._proc: Any = None
        self._tmp: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return int(self._proc.pid) if self.running else None

    def _config(self, workdir: str) -> str:
        import os

        text = MOSQUITTO_CONF.format(host=self.host, port=self.port)
        if self.persistence:
            # autosave 1 s: a SIGKILL loses at most a second of queued messages.
            text += f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
        else:
            text += "persistence false\n"
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the `mosquitto` user, which cannot write to
            # this private 0700 directory; a throwaway benchmark broker stays as it is.
            import pwd

            text += f"user {pwd.getpwuid(0).pw_name}\n"
        return text

    def start(self, timeout_s: float = 10.0) -> MosquittoProcess:
        import subprocess
        import tempfile
        import time
        from pathlib import Path

        if self.running:
            return self
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fogline-mosquitto-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        conf.write_text(self._config(self._tmp.name))
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

    def _terminate(self) -> None:
        import subprocess

        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self, timeout_s: float = 10.0) -> MosquittoProcess:
        """SIGTERM (Mosquitto saves its database), then start again on the same port."""
        self._terminate()
        return self.start(timeout_s)

    def kill(self) -> None:
        """SIGKILL, keeping the working directory for a later :meth:`start`."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
