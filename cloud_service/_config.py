"""The cloud worker's configuration: frozen dataclasses, read from ``cloud.toml``.

Every dataclass validates itself on construction, so a config built in Python is held
to the same rules as one read from a file. :meth:`CloudConfig.from_toml` adds what only
a file needs: unknown keys and wrong types are refused with the dotted key that is wrong
(``batching.max_batch_size``), and relative bundle and TLS file paths are taken relative to
the file (TLS files must exist). The ``[broker]`` table is read by
:func:`fogline._config.broker_settings`, the same parser the edge agent uses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fogline._config import ConfigValueError, Section, broker_settings, load_toml
from fogline._mqtt import MqttSettings, Topics, parse_broker_url
from fogline.cloud_service.errors import ConfigError

__all__ = [
    "BACKEND_KINDS",
    "BatchingConfig",
    "CloudConfig",
    "HttpConfig",
    "StoreConfig",
    "TensorRTConfig",
    "default_engine_cache_dir",
]

BackendKind = Literal["auto", "onnxruntime", "tensorrt"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "onnxruntime", "tensorrt")
DEFAULT_SHARE_GROUP = "fogline-cloud"
DEFAULT_STORE_URL = "sqlite:///fogline-results.db"


def _default_bundles() -> tuple[Path, ...]:
    from fogline.reference import BUNDLE_DIR

    return (BUNDLE_DIR,)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def default_engine_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fogline/engines`` (``~/.cache/fogline/engines``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fogline" / "engines"


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching: a batch closes when full or when its oldest item has waited long
    enough; at most ``max_queue_items`` wait in total, more are answered "busy"."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_items: int = 10_000
    busy_retry_after_ms: int = 100

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ValueError(
                f"max_queue_delay_ms must lie in [0, 10000], got {self.max_queue_delay_ms}"
            )
        if self.max_queue_items < self.max_batch_size:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least "
                f"max_batch_size ({self.max_batch_size})"
            )
        if self.busy_retry_after_ms < 1:
            raise ValueError(
                f"busy_retry_after_ms must be at least 1, got {self.busy_retry_after_ms}"
            )


@dataclass(frozen=True)
class StoreConfig:
    """Where results are kept: an SQLAlchemy URL (SQLite by default, PostgreSQL by
    ``postgresql+psycopg://user@host/db``)."""

    url: str = DEFAULT_STORE_URL

    def __post_init__(self) -> None:
        if "://" not in self.url:
            raise ValueError(f"url {self.url!r} is not a database URL (e.g. sqlite:///x.db)")


@dataclass(frozen=True)
class HttpConfig:
    """Where ``fogline cloud serve`` listens for HTTP."""

    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must lie in 0..65535, got {self.port}")


@dataclass(frozen=True)
class TensorRTConfig:
    """Native TensorRT backend: where built engines are cached, and whether TensorRT 10 may
    pick FP16 kernels (TensorRT 11 takes precision from the model itself)."""

    engine_cache_dir: Path = field(default_factory=default_engine_cache_dir)
    fp16: bool = False


@dataclass(frozen=True)
class CloudConfig:
    """Everything a cloud worker needs.

    ``share_group`` names the MQTT shared subscription (``$share/<group>/…``) that lets
    several workers split the load; ``None`` subscribes to the plain topic, which the
    embedded broker (no shared subscriptions) needs. ``threads`` is the backend's
    intra-op thread count (0: the backend's default).
    """

    broker: MqttSettings = field(default_factory=MqttSettings)
    share_group: str | None = DEFAULT_SHARE_GROUP
    bundles: tuple[Path, ...] = field(default_factory=_default_bundles)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    backend: BackendKind = "auto"
    worker_id: str = field(default_factory=_default_worker_id)
    threads: int = 1
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)

    def __post_init__(self) -> None:
        if self.share_group == "":
            object.__setattr__(self, "share_group", None)
        if self.share_group is not None and any(c in self.share_group for c in "/+#\x00"):
            raise ValueError(
                f"share_group {self.share_group!r} must not contain '/', '+', '#' or NUL"
            )
        object.__setattr__(self, "bundles", tuple(Path(b) for b in self.bundles))
        if not self.bundles:
            raise ValueError("bundles must name at least one bundle directory")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(
                f"backend must be one of {', '.join(BACKEND_KINDS)}, got {self.backend!r}"
            )
        if not self.worker_id or any(c in self.worker_id for c in "/+#\x00"):
            raise ValueError(
                f"worker_id {self.worker_id!r} must be non-empty, without '/', '+', '#'"
            )
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (backend default) or more, got {self.threads}")

    @property
    def topics(self) -> Topics:
        return self.broker.topics

    @property
    def mqtt_settings(self) -> MqttSettings:
        """Broker settings with a client id derived from the worker id unless one is set."""
        if self.broker.client_id:
            return self.broker
        return self.broker.with_client_id(f"fogline-cloud-{self.worker_id}")

    def with_overrides(
        self,
        *,
        broker_url: str | None = None,
        bundles: tuple[Path, ...] | None = None,
        http_host: str | None = None,
        http_port: int | None = None,
        store_url: str | None = None,
    ) -> CloudConfig:
        """A copy with command-line overrides applied; raises :class:`ConfigError`."""
        try:
            broker = self.broker
            if broker_url is not None:
                broker = dataclasses.replace(broker, **parse_broker_url(broker_url))
            http = HttpConfig(
                host=self.http.host if http_host is None else http_host,
                port=self.http.port if http_port is None else http_port,
            )
            store = self.store if store_url is None else StoreConfig(store_url)
            return dataclasses.replace(
                self,
                broker=broker,
                bundles=self.bundles if bundles is None else bundles,
                http=http,
                store=store,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> CloudConfig:
        """Read ``cloud.toml``; raises :class:`ConfigError` naming the bad key."""
        path = Path(path)
        try:
            data = load_toml(path)
        except ConfigValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_mapping(data, base_dir=path.parent, source=str(path))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base_dir: Path | None = None, source: str = "config"
    ) -> CloudConfig:
        """Build from parsed TOML (or any mapping of the same shape)."""
        try:
            return _read(Section(data, base_dir=base_dir))
        except ConfigValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None


_SECTIONS: dict[str, tuple[type[Any], dict[str, type]]] = {
    "batching": (
        BatchingConfig,
        {
            "max_batch_size": int,
            "max_queue_delay_ms": float,
            "max_queue_items": int,
            "busy_retry_after_ms": int,
        },
    ),
    "store": (StoreConfig, {"url": str}),
    "http": (HttpConfig, {"host": str, "port": int}),
    "tensorrt": (TensorRTConfig, {"engine_cache_dir": str, "fp16": bool}),
}


def _read(top: Section) -> CloudConfig:
    kwargs: dict[str, Any] = {}
    raw_broker = top.raw("broker")
    if isinstance(raw_broker, str):
        # `broker = "mqtt://host:1883"` is short for a [broker] table with only a url.
        kwargs["broker"] = broker_settings(
            Section({"url": raw_broker}, "broker", base_dir=top.base_dir)
        )
    elif raw_broker is not None:
        kwargs["broker"] = broker_settings(top.table("broker"))

    if (group := top.get("share_group", str)) is not None:
        kwargs["share_group"] = group or None
    if (bundles := top.get("bundles", list)) is not None:
        paths = []
        for i, item in enumerate(bundles):
            if not isinstance(item, str) or not item:
                top.fail(f"bundles[{i}]", "must be a directory path (string)")
            paths.append(top.resolve(item))
        kwargs["bundles"] = tuple(paths)
    kwargs.update(top.read({"backend": str, "worker_id": str, "threads": int}))

    for name, (klass, keys) in _SECTIONS.items():
        if name not in top:
            continue
        sec = top.table(name)
        values = sec.read(keys)
        if "engine_cache_dir" in values:
            values["engine_cache_dir"] = Path(values["engine_cache_dir"]).expanduser()
        sec.done()
        kwargs[name] = sec.build(klass, values)
    top.done()
    return top.build(CloudConfig, kwargs)
