"""How to reach the broker: :class:`MqttSettings`, its TLS part and broker URLs."""

from __future__ import annotations

import dataclasses
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from ._topics import DEFAULT_TOPIC_PREFIX, Topics

__all__ = ["MqttSettings", "TlsSettings", "parse_broker_url"]


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker, validated on construction.

    ``ca_file`` is the CA bundle to verify the broker with (the system's when ``None``);
    ``cert_file``/``key_file`` a client certificate. ``insecure`` skips verification of
    the broker's certificate and host name: for tests only.
    """

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty path, got {value!r}")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs a cert_file to go with it")


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
        self.tls_settings  # noqa: B018  (validates the TLS part)

    @property
    def tls_settings(self) -> TlsSettings:
        """The TLS part of these settings as its own validated value."""
        return TlsSettings(
            enabled=self.tls,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            insecure=self.tls_insecure,
        )

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def with_client_id(self, client_id: str) -> MqttSettings:
        return dataclasses.replace(self, client_id=client_id)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttSettings:
        return cls(**{**parse_broker_url(url), **overrides})


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
