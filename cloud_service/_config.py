"""The cloud worker's configuration: frozen dataclasses, read from ``cloud.toml``.

Every dataclass validates itself on construction, so a config built in Python is held
to the same rules as one read from a file. :meth:`CloudConfig.from_toml` adds what only
a file needs: unknown keys and wrong types are refused with the dotted key that is wrong
(``batching.max_batch_size``), and relative bundle and TLS file paths are taken relative to
the file (TLS files must exist). The ``[broker]`` table is read by
:func:`fogline.messaging.broker_settings`, the same parser the edge agent uses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fogline.cloud_service.errors import ConfigError
from fogline.messaging import (
    ConfigValueError,
    MqttSettings,
    Section,
    Topics,
    broker_settings,
    load_toml,
    parse_broker_url,
)

__all__ = [
    "BACKEND_KINDS",
    "BatchingConfig",
    "CloudConfig",
    "HttpConfig",
    "LaneConfig",
    "LaneConfigs",
    "ModelConfig",
    "StoreConfig",
    "SyncConfig",
    "TensorRTConfig",
    "VersionPolicy",
    "default_engine_cache_dir",
]

BackendKind = Literal["auto", "onnxruntime", "tensorrt", "torch"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "onnxruntime", "tensorrt", "torch")
DEFAULT_SHARE_GROUP = "fogline-cloud"
DEFAULT_STORE_URL = "sqlite:///fogline-results.db"


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
    ``postgresql+psycopg://user@host/db``). The store counts as stalled, and the worker as
    not ready, while results wait and no write has completed for ``stall_after_s``."""

    url: str = DEFAULT_STORE_URL
    stall_after_s: float = 10.0

    def __post_init__(self) -> None:
        if "://" not in self.url:
            raise ValueError(f"url {self.url!r} is not a database URL (e.g. sqlite:///x.db)")
        if not 0 < self.stall_after_s <= 86_400:
            raise ValueError(f"stall_after_s must lie in (0, 86400], got {self.stall_after_s}")


@dataclass(frozen=True)
class HttpConfig:
    """Where ``fogline cloud serve`` listens for HTTP."""

    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        # worded as the agent words its own http.port: one shape for both sides
        if self.port < 0:
            raise ValueError(f"port must be at least 0, got {self.port}")
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, got {self.port}")


@dataclass(frozen=True)
class SyncConfig:
    """Serving signed model sync (docs/cloud.md, "Sync"): the publisher's directory
    ``home`` (``fogline keys init``), whose two repositories are served under ``/sync/``;
    the fleet store's URL (``None``: ``sqlite:///<home>/fleet.db``, the default of the
    ``fogline rollout`` and ``fogline fleet`` commands, so both share one store); and how
    often running rollouts are stepped (``tick_s``). ``keys`` is where the director's
    online keys are (``None``: ``<home>/keys``, as for the ``fogline`` sync commands;
    ``fogline cloud serve`` fills in ``$FOGLINE_SYNC_KEYS`` when set)."""

    home: Path
    store: str | None = None
    tick_s: float = 5.0
    keys: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.home, str):
            object.__setattr__(self, "home", Path(self.home))
        if not isinstance(self.home, Path) or not str(self.home):
            raise ValueError(f"home must be a directory path, got {self.home!r}")
        object.__setattr__(self, "home", self.home.expanduser().absolute())
        if self.store is not None and "://" not in self.store:
            raise ValueError(
                f"store {self.store!r} is not a database URL (e.g. sqlite:///fleet.db)"
            )
        if isinstance(self.tick_s, bool) or not 0.01 <= self.tick_s <= 86_400:
            raise ValueError(f"tick_s must lie in [0.01, 86400], got {self.tick_s}")
        if isinstance(self.keys, str):
            object.__setattr__(self, "keys", Path(self.keys))
        if self.keys is not None:
            if not isinstance(self.keys, Path) or not str(self.keys):
                raise ValueError(f"keys must be a directory path, got {self.keys!r}")
            object.__setattr__(self, "keys", self.keys.expanduser().absolute())

    @property
    def store_url(self) -> str:
        """The fleet store's URL: ``store``, else ``fleet.db`` in the home."""
        return self.store if self.store is not None else f"sqlite:///{self.home / 'fleet.db'}"


@dataclass(frozen=True)
class TensorRTConfig:
    """Native TensorRT backend: where built engines are cached, and whether TensorRT 10 may
    pick FP16 kernels (TensorRT 11 takes precision from the model itself)."""

    engine_cache_dir: Path = field(default_factory=default_engine_cache_dir)
    fp16: bool = False
    device_id: int = 0
    execution_contexts: int = 2
    opt_batch_size: int | None = None

    def __post_init__(self) -> None:
        # Messages start with the field's name, as every other section's do, so that a
        # file's error reads tensorrt.device_id (Section.build adds the table's name).
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int):
            raise ConfigError(f"device_id must be an integer, got {self.device_id!r}")
        if self.device_id < 0:
            raise ConfigError(f"device_id must be at least 0, got {self.device_id}")
        if self.execution_contexts < 1:
            raise ConfigError(
                f"execution_contexts must be at least 1, got {self.execution_contexts}"
            )
        if self.opt_batch_size is not None and self.opt_batch_size < 1:
            raise ConfigError(f"opt_batch_size must be at least 1, got {self.opt_batch_size}")


@dataclass(frozen=True)
class CloudConfig:
    """Everything a cloud worker needs.

    ``share_group`` names the MQTT shared subscription (``$share/<group>/…``) that lets
    several workers split the load; ``None`` subscribes to the plain topic, which the
    embedded broker (no shared subscriptions) needs. ``threads`` is the backend's
    intra-op thread count (0: the backend's default). ``bundles`` empty means none is
    configured: the caller chooses one (``fogline cloud serve`` fills in the packaged
    reference bundle), since this package does not know where any bundle lives.
    """

    broker: MqttSettings = field(default_factory=MqttSettings)
    share_group: str | None = DEFAULT_SHARE_GROUP
    bundles: tuple[Path, ...] = ()
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    backend: BackendKind = "auto"
    worker_id: str = field(default_factory=_default_worker_id)
    threads: int = 1
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    sync: SyncConfig | None = None

    def __post_init__(self) -> None:
        if self.share_group == "":
            object.__setattr__(self, "share_group", None)
        if self.share_group is not None and any(c in self.share_group for c in "/+#\x00"):
            raise ValueError(
                f"share_group {self.share_group!r} must not contain '/', '+', '#' or NUL"
            )
        object.__setattr__(self, "bundles", tuple(Path(b) for b in self.bundles))
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
        sync_home: Path | None = None,
        sync_store: str | None = None,
        sync_tick_s: float | None = None,
    ) -> CloudConfig:
        """A copy with command-line overrides applied; raises :class:`ConfigError`.

        ``sync_store`` and ``sync_tick_s`` change the ``[sync]`` table, so they need a
        sync home (``sync_home`` or the table's ``home``)."""
        if (sync_home is None and self.sync is None) and (
            sync_store is not None or sync_tick_s is not None
        ):
            raise ConfigError("--sync-store and --sync-tick-s need --sync-home (or [sync] home)")
        try:
            broker = self.broker
            if broker_url is not None:
                broker = dataclasses.replace(broker, **parse_broker_url(broker_url))
            http = HttpConfig(
                host=self.http.host if http_host is None else http_host,
                port=self.http.port if http_port is None else http_port,
            )
            store = (
                self.store if store_url is None else dataclasses.replace(self.store, url=store_url)
            )
            sync = self.sync
            if sync_home is not None:
                sync = (
                    SyncConfig(sync_home)
                    if sync is None
                    else dataclasses.replace(sync, home=Path(sync_home))
                )
            if sync is not None and (sync_store is not None or sync_tick_s is not None):
                sync = dataclasses.replace(
                    sync,
                    store=sync.store if sync_store is None else sync_store,
                    tick_s=sync.tick_s if sync_tick_s is None else sync_tick_s,
                )
            return dataclasses.replace(
                self,
                broker=broker,
                bundles=self.bundles if bundles is None else bundles,
                http=http,
                store=store,
                sync=sync,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> CloudConfig:
        """Read ``cloud.toml``; raises :class:`ConfigError` naming the file and the bad key
        (``cloud.toml: http.port must be at most 65535, got 70000``), as the agent does."""
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
        """Build from parsed TOML (or any mapping of the same shape); errors name ``source``."""
        try:
            return _read(Section(data, base_dir=base_dir))
        except ConfigValueError as exc:
            raise ConfigError(str(exc.in_file(source))) from None


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
    "store": (StoreConfig, {"url": str, "stall_after_s": float}),
    "http": (HttpConfig, {"host": str, "port": int}),
    "tensorrt": (
        TensorRTConfig,
        {
            "engine_cache_dir": str,
            "fp16": bool,
            "device_id": int,
            "execution_contexts": int,
            "opt_batch_size": int,
        },
    ),
}


def _sqlite_url_from(url: str, base_dir: Path | None) -> str:
    """A relative SQLite path in a config file's ``[store] url`` is taken from the file's
    folder, as bundle paths are, not from wherever the process happens to start.

    ``sqlite:///results.db`` is relative (three slashes), ``sqlite:////var/x.db``
    absolute; ``sqlite://`` and ``:memory:`` are in memory and ``file:`` URIs are left
    as written.
    """
    scheme, sep, rest = url.partition("://")
    if base_dir is None or not sep or not scheme.startswith("sqlite") or not rest.startswith("/"):
        return url
    path, qsep, query = rest[1:].partition("?")
    if not path or path.startswith((":memory:", "/", "file:")):
        return url
    resolved = (base_dir / Path(path).expanduser()).absolute()
    return f"{scheme}:///{resolved}{qsep}{query}"


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
        if not bundles:
            # An empty list in a file is a mistake, not a request for the default bundle.
            top.fail("bundles", "must name at least one bundle directory")
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
        if name == "store" and isinstance(values.get("url"), str):
            values["url"] = _sqlite_url_from(values["url"], sec.base_dir)
        sec.done()
        kwargs[name] = sec.build(klass, values)
    if "sync" in top:
        kwargs["sync"] = _read_sync(top.table("sync"))
    top.done()
    return top.build(CloudConfig, kwargs)


def _read_sync(sec: Section) -> SyncConfig:
    """``[sync]``: ``home`` (required; relative to the file), ``store`` (a relative SQLite
    path relative to the file, as ``[store] url``), ``tick_s``, ``keys`` (relative to the
    file)."""
    values = sec.read({"home": str, "store": str, "tick_s": float, "keys": str})
    if "home" not in values:
        sec.fail("home", "is required: the sync home directory (fogline keys init)")
    if not values["home"]:
        sec.fail("home", "must be a directory path")
    values["home"] = sec.resolve(values["home"])
    if isinstance(values.get("store"), str):
        values["store"] = _sqlite_url_from(values["store"], sec.base_dir)
    if "keys" in values:
        if not values["keys"]:
            sec.fail("keys", "must be a directory path")
        values["keys"] = sec.resolve(values["keys"])
    sec.done()
    return sec.build(SyncConfig, values)


# ---------------------------------------------------------------------------------------
# Model repository: per-model serving settings, read from ``<repo>/<model>/config.toml``.


@dataclass(frozen=True)
class LaneConfig:
    """One lane of one model: at most ``max_queue_items`` requests wait in it (more are
    answered "busy"); a request that has not started within ``timeout_ms`` (unless it asks
    for its own timeout) is rejected unserved; ``weight`` is the lane's share of batch slots
    while several lanes have work waiting."""

    max_queue_items: int
    timeout_ms: float
    weight: int

    def __post_init__(self) -> None:
        if self.max_queue_items < 1:
            raise ValueError(f"max_queue_items must be at least 1, got {self.max_queue_items}")
        if not 0 < self.timeout_ms <= 86_400_000:
            raise ValueError(
                f"timeout_ms must lie in (0, 86400000] (one day), got {self.timeout_ms}"
            )
        if not 1 <= self.weight <= 1000:
            raise ValueError(f"weight must lie in 1..1000, got {self.weight}")


def _interactive_lane() -> LaneConfig:
    return LaneConfig(max_queue_items=1024, timeout_ms=2_000.0, weight=8)


def _stream_lane() -> LaneConfig:
    return LaneConfig(max_queue_items=4096, timeout_ms=5_000.0, weight=3)


def _bulk_lane() -> LaneConfig:
    return LaneConfig(max_queue_items=1024, timeout_ms=600_000.0, weight=1)


@dataclass(frozen=True)
class LaneConfigs:
    """The three lanes of a model (see :class:`fogline.cloud_service._serving.Lane`).

    Defaults: interactive 1024 requests, 2 s, weight 8; stream 4096, 5 s, weight 3; bulk
    1024, 10 min, weight 1. Under full load of all three, batches go 8:3:1.
    """

    interactive: LaneConfig = field(default_factory=_interactive_lane)
    stream: LaneConfig = field(default_factory=_stream_lane)
    bulk: LaneConfig = field(default_factory=_bulk_lane)

    def __getitem__(self, lane: str) -> LaneConfig:
        """The settings of ``lane`` (a :class:`Lane` or its value)."""
        if lane not in ("interactive", "stream", "bulk"):
            raise KeyError(lane)
        value: LaneConfig = getattr(self, str(lane))
        return value


VersionPolicyKind = Literal["latest", "all", "specific"]


@dataclass(frozen=True)
class VersionPolicy:
    """Which numbered version folders of a model are served: the ``latest`` N (default 1),
    ``all``, or a ``specific`` list."""

    kind: VersionPolicyKind = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(f"kind must be latest, all or specific, got {self.kind!r}")
        if self.kind == "latest" and self.latest < 1:
            raise ValueError(f"latest must be at least 1, got {self.latest}")
        if self.kind == "specific":
            if not self.versions:
                raise ValueError("versions must name at least one version")
            if any(v < 1 for v in self.versions):
                raise ValueError(f"versions must be positive integers, got {list(self.versions)}")
            object.__setattr__(self, "versions", tuple(sorted(set(self.versions))))

    def select(self, available: Sequence[int]) -> tuple[int, ...]:
        """The versions to serve out of ``available``, ascending.

        Raises ``ValueError`` when a ``specific`` version is not available.
        """
        have = sorted(set(available))
        if self.kind == "all":
            return tuple(have)
        if self.kind == "latest":
            return tuple(have[-self.latest :])
        missing = [v for v in self.versions if v not in have]
        if missing:
            raise ValueError(
                f"version_policy names version(s) {', '.join(map(str, missing))}, which have "
                f"no folder (available: {', '.join(map(str, have)) or 'none'})"
            )
        return self.versions


@dataclass(frozen=True)
class ModelConfig:
    """How one model is served.

    ``max_batch_size`` is in rows (the first axis): ``None`` means 32 when the model's first
    axis is dynamic and 0 otherwise; 0 turns batching off (requests run one by one, shapes as
    the model declares them). A batch is formed as soon as a ``preferred_batch_sizes`` size
    (the largest reachable) or ``max_batch_size`` rows are waiting, or when the oldest
    request has waited ``max_queue_delay_ms`` (default 0: whatever waits when the model is
    free runs together). ``busy_retry_after_ms`` is the back-off asked of a refused sender.
    """

    max_batch_size: int | None = None
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    busy_retry_after_ms: int = 100
    lanes: LaneConfigs = field(default_factory=LaneConfigs)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and not 0 <= self.max_batch_size <= 65_536:
            raise ValueError(f"max_batch_size must lie in 0..65536, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ValueError(
                f"max_queue_delay_ms must lie in [0, 10000], got {self.max_queue_delay_ms}"
            )
        sizes = tuple(self.preferred_batch_sizes)
        if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(
                f"preferred_batch_sizes must be distinct positive sizes, got {list(sizes)}"
            )
        if sizes and self.max_batch_size is not None and max(sizes) > self.max_batch_size:
            raise ValueError(
                f"preferred_batch_sizes must not exceed max_batch_size "
                f"({self.max_batch_size}), got {list(sizes)}"
            )
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(sizes)))
        if self.busy_retry_after_ms < 1:
            raise ValueError(
                f"busy_retry_after_ms must be at least 1, got {self.busy_retry_after_ms}"
            )

    @classmethod
    def from_toml(cls, path: str | Path) -> ModelConfig:
        """Read a model's ``config.toml``; raises :class:`ConfigError` naming the bad key.

        Layout (every key optional)::

            max_batch_size = 16
            max_queue_delay_ms = 1.0
            preferred_batch_sizes = [4, 8]
            busy_retry_after_ms = 100

            [version_policy]        # exactly one of these
            latest = 2              # all = true    specific = [1, 3]

            [lanes.interactive]     # and [lanes.stream], [lanes.bulk]
            max_queue_items = 256
            timeout_ms = 1000
            weight = 8
        """
        path = Path(path)
        try:
            data = load_toml(path)
        except ConfigValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> ModelConfig:
        """Build from parsed TOML (or any mapping of the same shape)."""
        try:
            return _read_model(Section(data))
        except ConfigValueError as exc:
            raise ConfigError(str(exc.in_file(source))) from None


def _read_model(top: Section) -> ModelConfig:
    kwargs: dict[str, Any] = top.read(
        {"max_batch_size": int, "max_queue_delay_ms": float, "busy_retry_after_ms": int}
    )
    sizes = top.get("preferred_batch_sizes", list)
    if sizes is not None:
        for i, size in enumerate(sizes):
            if not isinstance(size, int) or isinstance(size, bool):
                top.fail(f"preferred_batch_sizes[{i}]", f"must be an integer, got {size!r}")
        kwargs["preferred_batch_sizes"] = tuple(sizes)
    if "version_policy" in top:
        kwargs["version_policy"] = _read_version_policy(top.table("version_policy"))
    if "lanes" in top:
        lanes = top.table("lanes")
        defaults = LaneConfigs()
        chosen: dict[str, LaneConfig] = {}
        for lane in ("interactive", "stream", "bulk"):
            if lane not in lanes:
                continue
            sec = lanes.table(lane)
            base = defaults[lane]
            values: dict[str, Any] = {
                "max_queue_items": base.max_queue_items,
                "timeout_ms": base.timeout_ms,
                "weight": base.weight,
            }
            values.update(sec.read({"max_queue_items": int, "timeout_ms": float, "weight": int}))
            sec.done()
            chosen[lane] = sec.build(LaneConfig, values)
        lanes.done()
        kwargs["lanes"] = LaneConfigs(**chosen)
    top.done()
    return top.build(ModelConfig, kwargs)


def _read_version_policy(sec: Section) -> VersionPolicy:
    given = [k for k in ("latest", "all", "specific") if k in sec]
    if len(given) != 1:
        raise ConfigValueError(
            sec.prefix,
            "must set exactly one of latest = N, all = true, specific = [versions]",
            whole_table=True,
        )
    policy: VersionPolicy
    if given[0] == "latest":
        latest = sec.get("latest", int)
        if latest is None or latest < 1:
            sec.fail("latest", f"must be a positive integer, got {latest!r}")
        policy = VersionPolicy("latest", latest=latest)
    elif given[0] == "all":
        if sec.get("all", bool) is not True:
            sec.fail("all", "must be true (leave it out otherwise)")
        policy = VersionPolicy("all")
    else:
        versions = sec.get("specific", list) or []
        for i, v in enumerate(versions):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                sec.fail(f"specific[{i}]", f"must be a positive integer version, got {v!r}")
        if not versions:
            sec.fail("specific", "must name at least one version")
        policy = VersionPolicy("specific", versions=tuple(versions))
    sec.done()
    return policy
