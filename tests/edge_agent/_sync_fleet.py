"""A sync home served over real HTTP for agent tests: both repositories under ``/sync/``,
the nonce and report endpoints of the cloud's contract, and a site enrolled against it.

The cloud serves these with ``fogline cloud serve --sync-home``; this stand-in serves the
same paths from the home's directories with ``http.server`` and verifies every report it
receives, so agent tests can gate and count downloads.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fogline.sync import (
    NonceLedger,
    Platform,
    SiteIdentity,
    StatusReport,
    SyncHome,
    enroll,
    verify_status_report,
)
from tests.conftest import make_tiny_bundle

_NONCE = re.compile(r"^/v1/sync/sites/([^/]+)/nonce$")


@dataclass
class SyncServer:
    """The stand-in sync endpoint. ``gate``: a path fragment whose downloads wait until
    ``gate_open`` is set (``gated`` is set once one waits); ``down``: answer 503 to all."""

    home: SyncHome
    keys: dict[str, Any] = field(default_factory=dict)
    ledger: NonceLedger = field(default_factory=NonceLedger)
    reports: list[StatusReport] = field(default_factory=list)
    refused_reports: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    gate: str | None = None
    gate_open: threading.Event = field(default_factory=threading.Event)
    gated: threading.Event = field(default_factory=threading.Event)
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    _httpd: ThreadingHTTPServer | None = None

    def start(self) -> SyncServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with server.lock:
                    server.requests.append(self.path)
                if server.down:
                    self._send(503)
                    return
                m = _NONCE.match(self.path)
                if m:
                    body = json.dumps({"nonce": server.ledger.issue(m.group(1))}).encode()
                    self._send(200, body)
                    return
                if not self.path.startswith("/sync/"):
                    self._send(404)
                    return
                rel = self.path.removeprefix("/sync/")
                root = server.home.path.resolve()
                file = (root / rel).resolve()
                if root not in file.parents or not file.is_file():
                    self._send(404)
                    return
                if server.gate is not None and server.gate in rel and "/targets/" in self.path:
                    server.gated.set()
                    server.gate_open.wait(30)
                self._send(200, file.read_bytes())

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                if server.down or self.path != "/v1/sync/reports":
                    self._send(503 if server.down else 404)
                    return
                try:
                    report = verify_status_report(data, server.keys, server.ledger)
                except Exception as exc:
                    with server.lock:
                        server.refused_reports.append(f"{type(exc).__name__}: {exc}")
                    self._send(400)
                    return
                with server.lock:
                    server.reports.append(report)
                self._send(202)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self

    def stop(self) -> None:
        self.gate_open.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def phases(self) -> list[str]:
        with self.lock:
            return [r.phase for r in self.reports]


@dataclass
class SyncFleet:
    """A home with tiny bundles ``tiny@1``, ``tiny@2`` released, a server, and one
    enrolled site (``site-a``, region ``eu``)."""

    home: SyncHome
    server: SyncServer
    state_dir: Path
    bundles: dict[str, Path]
    site: str = "site-a"

    def assign(self, version: str) -> None:
        self.home.assign([self.site], "tiny", version)

    def expire_director_timestamp(self) -> None:
        """From now on the director's timestamp is signed for 0.0864 s only; re-sign it."""
        settings = json.loads((self.home.path / "settings.json").read_text())
        settings["expiry"]["director"]["timestamp_days"] = 1e-6
        (self.home.path / "settings.json").write_text(json.dumps(settings))


def make_sync_fleet(tmp: Path, versions: tuple[str, ...] = ("1", "2")) -> SyncFleet:
    home = SyncHome.init(tmp / "home", site_bins_bits=2)
    bundles: dict[str, Path] = {}
    for k, version in enumerate(versions):
        path = make_tiny_bundle(tmp / f"src-{version}", version=version, seed=k)
        bundles[version] = path
        home.publish(
            path,
            name="tiny",
            version=version,
            platform=Platform("1.20"),
            regions=("eu",),
            min_agent_version="0.0",
        )
    state = tmp / "site-state"
    enroll(state, home.root_file("catalogue"), home.root_file("director"), "site-a", "eu")
    server = SyncServer(home)
    server.keys["site-a"] = SiteIdentity.load(state).public_key
    server.start()
    return SyncFleet(home, server, state, bundles)


def wait_for(what: Callable[[], object], timeout_s: float = 30.0, step_s: float = 0.05) -> Any:
    """``what()`` once truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {what}")
        time.sleep(step_s)
