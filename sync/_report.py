"""Signed status reports: what a site runs and how it fares, signed with the site's key.

A report is a DSSE envelope (securesystemslib's) whose payload is JSON::

    {"format": 1, "site": "plant-7", "bundle": "reference@3", "release": 3,
     "manifest_sha256": "…", "health": {"items_per_s": 41.5, "errors": 0},
     "phase": "active", "desired": "reference@4", "stale": false, "error": null,
     "nonce": "<from the director>", "time_ms": 1780000000000}

``bundle`` is what the site runs; ``desired`` the bundle its update is working towards
(``None`` when it runs what it was told to); ``phase`` where that update stands (one of
:data:`PHASES`); ``stale`` is true when the site's signed metadata has expired (it keeps
serving its verified bundle, installs nothing, and refreshes when it can); ``error`` is a
short reason when ``phase`` is ``failed``.

The nonce is one the director issued to that site (:class:`NonceLedger`); it is used once,
so a recorded report cannot be played back as a fresh one. Verification checks, in
order: size and form, that the named site's key signed it (another site's key does not
do), then the nonce — so an unsigned report cannot use up a site's nonces.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key, Signer

from fogline.sync._names import check_name
from fogline.sync.errors import ReplayedReportError, ReportError

__all__ = [
    "PHASES",
    "REPORT_PAYLOAD_TYPE",
    "NonceLedger",
    "StatusReport",
    "make_status_report",
    "verify_status_report",
]

REPORT_PAYLOAD_TYPE = "application/vnd.fogline.status+json"
REPORT_FORMAT = 1
MAX_REPORT_BYTES = 64 * 1024
_MAX_HEALTH_FIELDS = 64
_MAX_NONCE_CHARS = 128
_MAX_ERROR_CHARS = 512
#: Where a site's update stands: nothing to do, fetching, verified and staged (warming
#: up), running the desired bundle, or refused / failed (``error`` says why).
PHASES = frozenset({"idle", "downloading", "verified", "active", "failed"})


@dataclass(frozen=True)
class StatusReport:
    """What a site says of itself. ``bundle`` is ``name@version`` (``None`` before the first
    install); ``health`` holds finite numbers by short names."""

    site: str
    nonce: str
    bundle: str | None = None
    release: int | None = None
    manifest_sha256: str | None = None
    health: Mapping[str, float] = field(default_factory=dict)
    time_ms: int = 0
    phase: str = "idle"
    desired: str | None = None
    stale: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        check_name(self.site, "site")
        if not isinstance(self.nonce, str) or not 1 <= len(self.nonce) <= _MAX_NONCE_CHARS:
            raise ValueError("nonce must be a string of 1 to 128 characters")
        if self.bundle is not None and not isinstance(self.bundle, str):
            raise ValueError("bundle must be name@version or None")
        if self.release is not None and (
            isinstance(self.release, bool) or not isinstance(self.release, int)
        ):
            raise ValueError("release must be an integer or None")
        if self.manifest_sha256 is not None and (
            not isinstance(self.manifest_sha256, str) or len(self.manifest_sha256) != 64
        ):
            raise ValueError("manifest_sha256 must be 64 hex digits or None")
        if not isinstance(self.health, Mapping) or len(self.health) > _MAX_HEALTH_FIELDS:
            raise ValueError(f"health must map at most {_MAX_HEALTH_FIELDS} names to numbers")
        health = {}
        for name, value in self.health.items():
            check_name(name, "health field")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"health {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"health {name} must be finite, got {value!r}")
            health[name] = value
        object.__setattr__(self, "health", MappingProxyType(health))
        if isinstance(self.time_ms, bool) or not isinstance(self.time_ms, int):
            raise TypeError("time_ms must be an integer")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {sorted(PHASES)}, got {self.phase!r}")
        if self.desired is not None and not isinstance(self.desired, str):
            raise ValueError("desired must be name@version or None")
        if not isinstance(self.stale, bool):
            raise TypeError("stale must be true or false")
        if self.error is not None and (
            not isinstance(self.error, str) or len(self.error) > _MAX_ERROR_CHARS
        ):
            raise ValueError(f"error must be a string of at most {_MAX_ERROR_CHARS} characters")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "site": self.site,
            "bundle": self.bundle,
            "release": self.release,
            "manifest_sha256": self.manifest_sha256,
            "health": dict(self.health),
            "nonce": self.nonce,
            "time_ms": self.time_ms,
            "phase": self.phase,
            "desired": self.desired,
            "stale": self.stale,
            "error": self.error,
        }


def make_status_report(report: StatusReport, signer: Signer) -> bytes:
    """``report`` as a DSSE envelope signed with the site's key."""
    payload = json.dumps(report.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    envelope = Envelope(payload, REPORT_PAYLOAD_TYPE, {})
    envelope.sign(signer)
    return json.dumps(envelope.to_dict(), separators=(",", ":")).encode()


class NonceLedger:
    """The nonces a director issued, per site, each good for one report; only the newest
    ``per_site`` of a site stay valid. Thread-safe."""

    def __init__(self, *, per_site: int = 8) -> None:
        if per_site < 1:
            raise ValueError(f"per_site must be >= 1, got {per_site}")
        self._per_site = per_site
        self._issued: dict[str, deque[str]] = {}
        self._lock = threading.Lock()

    def issue(self, site: str) -> str:
        check_name(site, "site")
        nonce = secrets.token_hex(16)
        with self._lock:
            self._issued.setdefault(site, deque(maxlen=self._per_site)).append(nonce)
        return nonce

    def consume(self, site: str, nonce: str) -> None:
        """Use ``nonce`` of ``site`` up; :class:`ReplayedReportError` when it was never
        issued to that site or was used already."""
        with self._lock:
            issued = self._issued.get(site)
            if issued is None or nonce not in issued:
                raise ReplayedReportError(
                    f"report of site {site!r} carries a nonce that was used already or "
                    "never issued to it (a replayed report)"
                )
            issued.remove(nonce)


def verify_status_report(data: bytes, keys: Mapping[str, Key], nonces: NonceLedger) -> StatusReport:
    """The report in ``data``, once its site's key (from ``keys``: site → public key) is
    found to have signed it and its nonce is used up; else :class:`ReportError`."""
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"a status report of {len(data)} bytes is over {MAX_REPORT_BYTES}")
    try:
        envelope = Envelope.from_dict(json.loads(data))
        body = json.loads(envelope.payload)
    except (
        UnicodeDecodeError,
        json.JSONDecodeError,
        RecursionError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        sslib_exceptions.FormatError,
    ) as exc:
        raise ReportError(f"a status report is malformed: {type(exc).__name__}") from None
    if envelope.payload_type != REPORT_PAYLOAD_TYPE:
        raise ReportError(f"payload type {envelope.payload_type!r} is not a status report")
    if not isinstance(body, dict) or body.get("format") != REPORT_FORMAT:
        raise ReportError("a status report must be a format 1 JSON object")
    site = body.get("site")
    key = keys.get(site) if isinstance(site, str) else None
    if key is None or not isinstance(site, str):
        raise ReportError(f"status report of unknown site {site!r}")
    try:
        envelope.verify([key], 1)
    except sslib_exceptions.VerificationError:
        raise ReportError(f"status report of site {site!r} is not signed by its key") from None
    try:
        report = StatusReport(
            site=site,
            nonce=body.get("nonce", ""),
            bundle=body.get("bundle"),
            release=body.get("release"),
            manifest_sha256=body.get("manifest_sha256"),
            health=body.get("health") or {},
            time_ms=body.get("time_ms", 0),
            phase=body.get("phase", "idle"),
            desired=body.get("desired"),
            stale=body.get("stale", False),
            error=body.get("error"),
        )
    except (TypeError, ValueError) as exc:
        raise ReportError(f"status report of site {site!r} is invalid: {exc}") from None
    nonces.consume(report.site, report.nonce)
    return report
