"""Agent configuration: ``agent.toml`` into frozen, validated dataclasses.

Every error names the offending key as it is spelled in ``agent.toml`` (``broker.port``,
``http.host``), so an operator can fix a file without reading code. Unknown keys are
errors too: a typo must not silently fall back to a default.

Example::

    site = "site-a"
    bundle_dir = "/var/lib/fogline/bundle"   # `fogline agent run` default: the reference bundle
    codec = "int8"                           # default: the bundle's codec
    cloud_timeout_ms = 10000

    [broker]
    url = "mqtts://agent:secret@broker.example:8883"
    ca_file = "/etc/fogline/ca.pem"
    protocol = "5"

    [runtime]
    threads = 1
    max_batch = 32

    [http]
    host = "127.0.0.1"
    port = 8081

    [outbox]
    path = "/var/lib/fogline/outbox-site-a.db"   # default: see OutboxConfig
    max_items = 100000
    max_bytes = 268435456
    max_age_s = 604800

    [breaker]
    failure_threshold = 5
    open_ms = 5000

    [sync]                                   # present: the site's bundle comes from sync
    state_dir = "/var/lib/fogline/sync"      # the state `fogline agent enroll` made
    url = "https://sync.example"             # the cloud's sync endpoint
    poll_s = 300                             # fallback polling; the MQTT nudge is at once
    report_s = 60                            # status reports (and at each phase change)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogline.compression import Codec
from fogline.edge_agent.errors import ConfigError
from fogline.messaging import ConfigValueError, MqttSettings, Section, broker_settings, load_toml
from fogline.sync import Thresholds

__all__ = [
    "AgentConfig",
    "BreakerConfig",
    "HttpConfig",
    "OutboxConfig",
    "RuntimeConfig",
    "SyncConfig",
    "default_state_dir",
    "load_config",
]

_SITE_FORBIDDEN = frozenset("/+#\x00")


def _check_site(site: object) -> str:
    if not isinstance(site, str):
        raise ConfigError("site", "must be a string")
    if not site:
        raise ConfigError("site", "must not be empty")
    if len(site.encode()) > 255:
        raise ConfigError("site", "must be at most 255 bytes of UTF-8")
    if site.startswith("$") or any(
        ch in _SITE_FORBIDDEN or ch.isspace() or not ch.isprintable() for ch in site
    ):
        raise ConfigError(
            "site",
            f"{site!r} is not usable as an MQTT topic level "
            "(no '/', '+', '#', whitespace or control characters, no leading '$')",
        )
    return site


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int(value: object, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum}, got {value}")
    return value


@dataclass(frozen=True)
class RuntimeConfig:
    """How the edge model runs.

    ``threads`` is onnxruntime's intra-op thread count (0 lets onnxruntime pick one per
    core; 1 leaves the other cores to MQTT and the HTTP API). ``max_batch`` bounds one
    model call on both paths; ``max_queue`` bounds single requests waiting for the model.
    """

    threads: int = 1
    max_batch: int = 32
    warmup_runs: int = 3
    max_queue: int = 1024

    def __post_init__(self) -> None:
        _int(self.threads, "runtime.threads", minimum=0, maximum=1024)
        _int(self.max_batch, "runtime.max_batch", minimum=1, maximum=65536)
        _int(self.warmup_runs, "runtime.warmup_runs", minimum=0, maximum=1000)
        _int(self.max_queue, "runtime.max_queue", minimum=1)


@dataclass(frozen=True)
class HttpConfig:
    """Where the local HTTP API listens: loopback only unless ``allow_remote`` says otherwise."""

    host: str = "127.0.0.1"
    port: int = 8081
    allow_remote: bool = False
    # A 64×64 frame as JSON lists is about 16 KiB; 8 MiB leaves room for large inputs and
    # keeps one request from holding hundreds of MB while it is parsed.
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("http.host", "must be a non-empty string")
        _int(self.port, "http.port", minimum=0, maximum=65535)
        _int(self.max_body_bytes, "http.max_body_bytes", minimum=1)
        if not isinstance(self.allow_remote, bool):
            raise ConfigError("http.allow_remote", "must be true or false")
        if not self.allow_remote and not _is_loopback(self.host):
            raise ConfigError(
                "http.host",
                f"{self.host!r} is not a loopback address; the agent API has no "
                "authentication, set http.allow_remote = true to expose it anyway",
            )


def default_state_dir() -> Path:
    """Where agents keep their outbox unless told otherwise: ``$FOGLINE_STATE_DIR``, else
    ``$XDG_STATE_HOME/fogline``, else ``~/.local/state/fogline``."""
    env = os.environ.get("FOGLINE_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fogline"


def _positive_float(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(key, f"must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class OutboxConfig:
    """The durable outbox (see :mod:`fogline.edge_agent._outbox`).

    ``path`` defaults to ``<state dir>/outbox-<site>.db`` (:func:`default_state_dir`).
    Bounds: ``max_items``, ``max_bytes`` (payload bytes), ``max_age_s``; past a bound the
    lowest-priority, then oldest items are evicted, counted and logged. ``synchronous``
    is ``full`` (fsync each transaction: survives power loss) or ``normal`` (survives a
    process crash). Unanswered items are re-sent after ``retry_initial_ms``, doubling up
    to ``retry_max_ms`` with +-20 % jitter; the backlog drains at no more than
    ``resend_rate_per_s`` items/s so fresh traffic keeps flowing.
    """

    path: Path | None = None
    max_items: int = 100_000
    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0
    synchronous: str = "full"
    retry_initial_ms: int = 3000
    retry_max_ms: int = 60_000
    resend_rate_per_s: int = 500

    def __post_init__(self) -> None:
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))
        if self.path is not None and not isinstance(self.path, Path):
            raise ConfigError("outbox.path", "must be a path")
        _int(self.max_items, "outbox.max_items", minimum=1)
        _int(self.max_bytes, "outbox.max_bytes", minimum=1024)
        object.__setattr__(self, "max_age_s", _positive_float(self.max_age_s, "outbox.max_age_s"))
        if self.synchronous not in ("full", "normal"):
            raise ConfigError(
                "outbox.synchronous", f"must be full or normal, got {self.synchronous!r}"
            )
        _int(self.retry_initial_ms, "outbox.retry_initial_ms", minimum=1)
        _int(self.retry_max_ms, "outbox.retry_max_ms", minimum=self.retry_initial_ms)
        _int(self.resend_rate_per_s, "outbox.resend_rate_per_s", minimum=1)

    def path_for(self, site: str) -> Path:
        return self.path if self.path is not None else default_state_dir() / f"outbox-{site}.db"


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker for callers waiting on the cloud (:mod:`._breaker`).

    ``offline`` says what a caller gets when the cloud cannot answer in time (timeout,
    breaker open, broker unreachable): ``degrade`` (the edge exit head's own answer, with
    ``status = "degraded"``) or ``fail`` (an error at once). Either way the item stays in
    the outbox and the cloud's answer, when it comes, goes to the agent's ``on_answer``.
    """

    failure_threshold: int = 5
    open_ms: int = 5000
    max_open_ms: int = 60_000
    offline: str = "degrade"

    def __post_init__(self) -> None:
        _int(self.failure_threshold, "breaker.failure_threshold", minimum=1)
        _int(self.open_ms, "breaker.open_ms", minimum=1)
        _int(self.max_open_ms, "breaker.max_open_ms", minimum=self.open_ms)
        if self.offline not in ("degrade", "fail"):
            raise ConfigError("breaker.offline", f"must be degrade or fail, got {self.offline!r}")


@dataclass(frozen=True)
class SyncConfig:
    """Where the site's bundles come from (docs/agent.md, "Updates").

    ``state_dir`` is the site's sync state (made by ``fogline agent enroll``); ``url`` the
    cloud's sync endpoint (``{url}/sync/catalogue``, ``{url}/sync/director``, nonces and
    reports under ``{url}/v1/sync``). The agent refreshes when nudged over MQTT and at
    least every ``poll_s``; it reports its status every ``report_s`` and at each phase
    change.
    """

    state_dir: Path
    url: str
    poll_s: float = 300.0
    report_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.state_dir, str):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not isinstance(self.state_dir, Path):
            raise ConfigError("sync.state_dir", "must be a path")
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError("sync.url", "must be a non-empty string")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                "sync.url", f"must be an http:// or https:// URL with a host, got {self.url!r}"
            )
        if parsed.query or parsed.fragment:
            raise ConfigError("sync.url", "must not carry a query or a fragment")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "poll_s", _positive_float(self.poll_s, "sync.poll_s"))
        object.__setattr__(self, "report_s", _positive_float(self.report_s, "sync.report_s"))

    @property
    def catalogue_url(self) -> str:
        return f"{self.url}/sync/catalogue"

    @property
    def director_url(self) -> str:
        return f"{self.url}/sync/director"


@dataclass(frozen=True)
class AgentConfig:
    """Everything one edge agent needs. Defaults give a loopback agent.

    ``bundle_dir`` ``None`` means none is configured: an agent cannot start without one
    (:meth:`bundle_path`), and ``fogline agent run`` fills in the packaged reference bundle;
    this package does not know where any bundle lives.

    ``sync`` (``None``: no updates) makes the agent run the bundle its site installed
    from the signed sync, and ``bundle_dir`` only until the first install.

    ``client_id`` defaults to ``fogline-agent-<site>``; ``codec`` (a :class:`Codec` or its
    name) and ``thresholds`` default to the bundle's own. ``broker.client_id`` is ignored:
    :meth:`mqtt_settings` fills in ``client_id``.
    """

    site: str
    bundle_dir: Path | None = None
    broker: MqttSettings = field(default_factory=MqttSettings)
    client_id: str = ""
    codec: Codec | None = None
    thresholds: Thresholds | None = None
    cloud_timeout_ms: int = 10_000
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    sync: SyncConfig | None = None

    def __post_init__(self) -> None:
        _check_site(self.site)
        if isinstance(self.bundle_dir, str):
            object.__setattr__(self, "bundle_dir", Path(self.bundle_dir))
        if self.bundle_dir is not None and not isinstance(self.bundle_dir, Path):
            raise ConfigError("bundle_dir", "must be a path")
        if not isinstance(self.broker, MqttSettings):
            raise ConfigError("broker", "must be MqttSettings")
        if not isinstance(self.client_id, str):
            raise ConfigError("client_id", "must be a string")
        if not self.client_id:
            object.__setattr__(self, "client_id", f"fogline-agent-{self.site}")
        if len(self.client_id.encode()) > 65535:
            raise ConfigError("client_id", "is too long")
        if isinstance(self.codec, str):
            try:
                object.__setattr__(self, "codec", Codec.parse(self.codec))
            except ValueError as exc:
                raise ConfigError("codec", str(exc)) from None
        if self.codec is not None and not isinstance(self.codec, Codec):
            raise ConfigError("codec", "must be one of int8, fp16, fp32")
        if self.thresholds is not None and not isinstance(self.thresholds, Thresholds):
            raise ConfigError("thresholds", "must be Thresholds")
        _int(self.cloud_timeout_ms, "cloud_timeout_ms", minimum=1)
        if not isinstance(self.runtime, RuntimeConfig):
            raise ConfigError("runtime", "must be RuntimeConfig")
        if not isinstance(self.http, HttpConfig):
            raise ConfigError("http", "must be HttpConfig")
        if not isinstance(self.outbox, OutboxConfig):
            raise ConfigError("outbox", "must be OutboxConfig")
        if not isinstance(self.breaker, BreakerConfig):
            raise ConfigError("breaker", "must be BreakerConfig")
        if self.sync is not None and not isinstance(self.sync, SyncConfig):
            raise ConfigError("sync", "must be SyncConfig")

    @property
    def outbox_path(self) -> Path:
        """The outbox file of this agent."""
        return self.outbox.path_for(self.site)

    def bundle_path(self) -> Path:
        """The bundle directory to run; :class:`ConfigError` when none is configured."""
        if self.bundle_dir is None:
            raise ConfigError("bundle_dir", "is not set: name the bundle directory to run")
        return self.bundle_dir

    def mqtt_settings(self) -> MqttSettings:
        """The broker settings with this agent's client id."""
        return self.broker.with_client_id(self.client_id)

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
        """Build from a parsed ``agent.toml``; relative paths are taken from ``base_dir``."""
        return _from_mapping(data, base_dir or Path.cwd())

    @classmethod
    def from_toml(cls, path: str | Path) -> AgentConfig:
        """Read and validate an ``agent.toml`` file."""
        return load_config(path)


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read ``agent.toml`` (or start from nothing) and apply dotted-key overrides.

    ``overrides`` come from the command line: ``{"site": "a", "broker.url": "mqtt://h:1883",
    "http.port": 9000}``. A broker URL given there replaces the file's ``host`` and ``port``.
    """
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    source: str | None = None
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = load_toml(path)
        except ConfigValueError as exc:
            raise ConfigError(exc.key, exc.problem, source=exc.source) from None
        base_dir = path.resolve().parent
    given = {dotted: value for dotted, value in (overrides or {}).items() if value is not None}
    for dotted, value in given.items():
        table: dict[str, Any] = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError(part, "must be a table")
            table = sub
        if dotted == "broker.url":
            table.pop("host", None)
            table.pop("port", None)
        table[leaf] = str(Path(value).resolve()) if dotted == "bundle_dir" else value
    try:
        return _from_mapping(data, base_dir)
    except ConfigError as exc:
        # A value from the file is named with the file; one the caller gave is not in it.
        if source is None or exc.source is not None or exc.key in given:
            raise
        raise ConfigError(
            exc.key, exc.problem, source=source, whole_table=exc.whole_table
        ) from None


_RUNTIME_KEYS: dict[str, type] = {
    "threads": int,
    "max_batch": int,
    "warmup_runs": int,
    "max_queue": int,
}
_HTTP_KEYS: dict[str, type] = {
    "host": str,
    "port": int,
    "allow_remote": bool,
    "max_body_bytes": int,
}
_OUTBOX_KEYS: dict[str, type] = {
    "max_items": int,
    "max_bytes": int,
    "max_age_s": float,
    "synchronous": str,
    "retry_initial_ms": int,
    "retry_max_ms": int,
    "resend_rate_per_s": int,
}
_SYNC_KEYS: dict[str, type] = {"url": str, "poll_s": float, "report_s": float}
_BREAKER_KEYS: dict[str, type] = {
    "failure_threshold": int,
    "open_ms": int,
    "max_open_ms": int,
    "offline": str,
}


def _from_mapping(data: Mapping[str, Any], base_dir: Path) -> AgentConfig:
    try:
        return _read(Section(data, base_dir=base_dir))
    except ConfigValueError as exc:
        raise ConfigError(exc.key, exc.problem, whole_table=exc.whole_table) from None


def _read(top: Section) -> AgentConfig:
    site = top.get("site", str)
    if site is None:
        top.fail("site", "is required")
    kwargs: dict[str, Any] = {"site": site}
    if (bundle_dir := top.path("bundle_dir")) is not None:
        kwargs["bundle_dir"] = bundle_dir
    kwargs.update(top.read({"client_id": str, "codec": str, "cloud_timeout_ms": int}))

    broker = top.table("broker")
    if "client_id" in broker:
        broker.fail("client_id", "is not a known key: the agent's client id is the top-level one")
    kwargs["broker"] = broker_settings(broker)

    runtime = top.table("runtime")
    runtime_values = runtime.read(_RUNTIME_KEYS)
    runtime.done()
    kwargs["runtime"] = RuntimeConfig(**runtime_values)

    http = top.table("http")
    http_values = http.read(_HTTP_KEYS)
    http.done()
    kwargs["http"] = HttpConfig(**http_values)

    outbox = top.table("outbox")
    outbox_values = outbox.read(_OUTBOX_KEYS)
    if (outbox_path := outbox.path("path")) is not None:
        outbox_values["path"] = outbox_path
    outbox.done()
    kwargs["outbox"] = OutboxConfig(**outbox_values)

    breaker = top.table("breaker")
    breaker_values = breaker.read(_BREAKER_KEYS)
    breaker.done()
    kwargs["breaker"] = BreakerConfig(**breaker_values)

    if "sync" in top:
        sync = top.table("sync")
        sync_values = sync.read(_SYNC_KEYS)
        state_dir = sync.path("state_dir")
        if state_dir is None:
            sync.fail("state_dir", "is required when [sync] is given")
        if "url" not in sync_values:
            sync.fail("url", "is required when [sync] is given")
        sync.done()
        kwargs["sync"] = SyncConfig(state_dir=state_dir, **sync_values)

    if "thresholds" in top:
        th = top.table("thresholds")
        values: list[float] = []
        for key in ("relevance", "exit_confidence"):
            value = th.get(key, float)
            if value is None:
                th.fail(key, "is required when [thresholds] is given")
            if not 0.0 <= value <= 1.0:
                th.fail(key, f"must lie in [0, 1], got {value}")
            values.append(value)
        th.done()
        kwargs["thresholds"] = Thresholds(relevance=values[0], exit_confidence=values[1])
    top.done()
    return AgentConfig(**kwargs)
