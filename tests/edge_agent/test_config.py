"""agent.toml: defaults, overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline._cli_agent import with_reference_bundle
from fogline.compression import Codec
from fogline.edge_agent import (
    Agent,
    AgentConfig,
    BreakerConfig,
    ConfigError,
    HttpConfig,
    OutboxConfig,
    RuntimeConfig,
    load_config,
)
from fogline.reference import BUNDLE_DIR
from fogline.sync import Thresholds


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_minimal_config_gets_loopback_defaults_and_a_per_site_client_id(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, 'site = "site-a"\n'))
    assert cfg.site == "site-a"
    assert cfg.client_id == "fogline-agent-site-a"
    assert cfg.mqtt_settings().client_id == "fogline-agent-site-a"
    assert cfg.bundle_dir is None  # the command fills in the reference bundle
    assert cfg.codec is None
    assert cfg.thresholds is None
    assert cfg.cloud_timeout_ms == 10_000
    assert cfg.http == HttpConfig(host="127.0.0.1", port=8081)
    assert cfg.runtime == RuntimeConfig()
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.protocol) == ("127.0.0.1", 1883, "3.1.1")


def test_a_full_config_reads_every_section(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "bundles").mkdir()
    cfg = load_config(
        _write(
            tmp_path,
            """
site = "plant-7"
bundle_dir = "bundles"
client_id = "agent-7"
codec = "fp16"
cloud_timeout_ms = 2500

[broker]
url = "mqtts://user:s3cret@broker.example:8884"
ca_file = "ca.pem"
protocol = 5
topic_prefix = "acme/fogline"
keepalive_s = 15

[runtime]
threads = 2
max_batch = 64

[thresholds]
relevance = 0.3
exit_confidence = 0.95

[http]
host = "::1"
port = 9000
""",
        )
    )
    assert cfg.bundle_dir == tmp_path / "bundles"  # relative to the file
    assert cfg.client_id == "agent-7"
    assert cfg.codec is Codec.FP16
    assert cfg.cloud_timeout_ms == 2500
    b = cfg.broker
    assert (b.host, b.port, b.tls, b.username, b.password) == (
        "broker.example",
        8884,
        True,
        "user",
        "s3cret",
    )
    assert b.ca_file == str(tmp_path / "ca.pem")
    assert b.protocol == "5"
    assert b.topic_prefix == "acme/fogline"
    assert b.keepalive_s == 15
    assert cfg.runtime.threads == 2
    assert cfg.runtime.max_batch == 64
    assert cfg.thresholds == Thresholds(relevance=0.3, exit_confidence=0.95)
    assert cfg.http.port == 9000
    assert "s3cret" not in repr(cfg)


def test_command_line_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'site = "a"\n[broker]\nhost = "old"\nport = 1000\nusername = "u"\n[http]\nport = 1\n',
    )
    cfg = load_config(
        path,
        {
            "site": "b",
            "broker.url": "mqtt://new-host:1884",
            "bundle_dir": Path("rel"),
            "http.port": 9100,
            "codec": None,  # not given on the command line
        },
    )
    assert cfg.site == "b"
    assert cfg.client_id == "fogline-agent-b"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username) == ("new-host", 1884, "u")
    assert cfg.bundle_dir == Path("rel").resolve()
    assert cfg.http.port == 9100


def test_config_without_a_file_needs_only_a_site() -> None:
    cfg = load_config(None, {"site": "solo"})
    assert cfg.site == "solo"


def test_the_agent_command_runs_the_reference_bundle_when_none_is_configured(
    tmp_path: Path,
) -> None:
    cfg = load_config(None, {"site": "solo"})
    with pytest.raises(ConfigError, match="bundle_dir is not set"):
        cfg.bundle_path()
    assert with_reference_bundle(cfg).bundle_path() == BUNDLE_DIR
    own = cfg.replace(bundle_dir=tmp_path)
    assert with_reference_bundle(own).bundle_dir == tmp_path


def test_an_agent_without_a_bundle_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="bundle_dir"):
        Agent(AgentConfig(site="a"))


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("", "site", "is required"),
        ('site = "a/b"', "site", "not usable as an MQTT topic level"),
        ('site = "a b"', "site", "not usable"),
        ('site = "$SYS"', "site", "not usable"),
        ("site = 3", "site", "must be a string"),
        ('site = "a"\nsitee = "b"', "sitee", "is not a known key"),
        ('site = "a"\ncodec = "int4"', "codec", "unknown feature codec"),
        ('site = "a"\ncloud_timeout_ms = 0', "cloud_timeout_ms", "at least 1"),
        ('site = "a"\ncloud_timeout_ms = "10"', "cloud_timeout_ms", "must be an integer"),
        ('site = "a"\n[broker]\nport = 70000', "broker.port", "at most 65535"),
        ('site = "a"\n[broker]\nport = true', "broker.port", "must be an integer"),
        ('site = "a"\n[broker]\nurl = "http://x"', "broker.url", "mqtt://"),
        ('site = "a"\n[broker]\nprotocol = "4"', "broker.protocol", '"3.1.1" or "5"'),
        ('site = "a"\n[broker]\nca_file = "nope.pem"', "broker.ca_file", "does not exist"),
        ('site = "a"\n[broker]\nclient_id = "x"', "broker.client_id", "is not a known key"),
        ('site = "a"\n[broker]\ntopic_prefix = "a/#"', "broker", "no wildcards"),
        ('site = "a"\n[runtime]\nthreads = -1', "runtime.threads", "at least 0"),
        ('site = "a"\n[runtime]\nmax_batch = 0', "runtime.max_batch", "at least 1"),
        ('site = "a"\n[runtime]\nbatch = 4', "runtime.batch", "is not a known key"),
        ('site = "a"\n[http]\nport = "x"', "http.port", "must be an integer"),
        (
            'site = "a"\n[thresholds]\nrelevance = 2.0\nexit_confidence = 0.5',
            "thresholds.relevance",
            "[0, 1]",
        ),
        ('site = "a"\n[thresholds]\nrelevance = 0.2', "thresholds.exit_confidence", "is required"),
        ('site = "a"\nbroker = 3', "broker", "must be a table"),
    ],
)
def test_a_bad_value_is_reported_with_its_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text + "\n"))
    assert info.value.key == key
    assert problem in str(info.value)
    # the file, the dotted key, what is wrong: the shape of every config error
    separator = ": " if info.value.whole_table else " "
    assert str(info.value).startswith(f"{tmp_path / 'agent.toml'}: {key}{separator}")
    assert info.value.source == str(tmp_path / "agent.toml")


def test_a_non_loopback_http_host_is_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.host '0\.0\.0\.0' is not a loopback"):
        load_config(_write(tmp_path, 'site = "a"\n[http]\nhost = "0.0.0.0"\n'))
    cfg = load_config(
        _write(tmp_path, 'site = "a"\n[http]\nhost = "0.0.0.0"\nallow_remote = true\n')
    )
    assert cfg.http.host == "0.0.0.0"
    assert HttpConfig(host="localhost").host == "localhost"


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "site = \n"))


def test_configs_built_in_code_are_validated_too() -> None:
    assert AgentConfig(site="a", codec="int8").codec is Codec.INT8  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="site"):
        AgentConfig(site="")
    with pytest.raises(ConfigError, match=r"runtime\.max_batch"):
        RuntimeConfig(max_batch=0)
    cfg = AgentConfig(site="a").replace(site="b", client_id="")
    assert cfg.client_id == "fogline-agent-b"


def test_outbox_and_breaker_tables_are_read_with_paths_from_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            """
site = "plant-7"

[outbox]
path = "state/outbox.db"
max_items = 500
max_bytes = 1048576
max_age_s = 3600
synchronous = "normal"
retry_initial_ms = 250
retry_max_ms = 4000
resend_rate_per_s = 50

[breaker]
failure_threshold = 3
open_ms = 1000
max_open_ms = 8000
offline = "fail"
""",
        )
    )
    assert cfg.outbox == OutboxConfig(
        path=tmp_path / "state" / "outbox.db",
        max_items=500,
        max_bytes=1_048_576,
        max_age_s=3600.0,
        synchronous="normal",
        retry_initial_ms=250,
        retry_max_ms=4000,
        resend_rate_per_s=50,
    )
    assert cfg.outbox_path == tmp_path / "state" / "outbox.db"
    assert cfg.breaker == BreakerConfig(
        failure_threshold=3, open_ms=1000, max_open_ms=8000, offline="fail"
    )


def test_without_an_outbox_path_each_site_gets_its_own_file_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOGLINE_STATE_DIR", str(tmp_path / "st"))
    cfg = load_config(None, {"site": "north"})
    assert cfg.outbox == OutboxConfig()
    assert cfg.breaker == BreakerConfig()
    assert cfg.outbox_path == tmp_path / "st" / "outbox-north.db"
    assert cfg.replace(site="south").outbox_path == tmp_path / "st" / "outbox-south.db"
    monkeypatch.delenv("FOGLINE_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert cfg.outbox_path == tmp_path / "xdg" / "fogline" / "outbox-north.db"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[outbox]\nmax_items = 0", "outbox.max_items", "at least 1"),
        ("[outbox]\nmax_items = 1.5", "outbox.max_items", "must be an integer"),
        ("[outbox]\nmax_bytes = 100", "outbox.max_bytes", "at least 1024"),
        ("[outbox]\nmax_bytes = true", "outbox.max_bytes", "must be an integer"),
        ("[outbox]\nmax_age_s = 0", "outbox.max_age_s", "must be a positive number"),
        ("[outbox]\nmax_age_s = -5.0", "outbox.max_age_s", "must be a positive number"),
        ("[outbox]\nmax_age_s = nan", "outbox.max_age_s", "must be a positive number"),
        ('[outbox]\nmax_age_s = "7d"', "outbox.max_age_s", "must be"),
        ('[outbox]\nsynchronous = "off"', "outbox.synchronous", "must be full or normal"),
        ("[outbox]\nsynchronous = 1", "outbox.synchronous", "must be"),
        ("[outbox]\nretry_initial_ms = 0", "outbox.retry_initial_ms", "at least 1"),
        (
            "[outbox]\nretry_initial_ms = 500\nretry_max_ms = 100",
            "outbox.retry_max_ms",
            "at least 500",
        ),
        ("[outbox]\nresend_rate_per_s = 0", "outbox.resend_rate_per_s", "at least 1"),
        ("[outbox]\npath = 3", "outbox.path", "must be"),
        ("[outbox]\nmax_pending = 10", "outbox.max_pending", "is not a known key"),
        ("outbox = 3", "outbox", "must be a table"),
        ("max_pending = 100", "max_pending", "is not a known key"),
        ("[breaker]\nfailure_threshold = 0", "breaker.failure_threshold", "at least 1"),
        ('[breaker]\nfailure_threshold = "5"', "breaker.failure_threshold", "must be"),
        ("[breaker]\nopen_ms = 0", "breaker.open_ms", "at least 1"),
        ("[breaker]\nopen_ms = 5000\nmax_open_ms = 1000", "breaker.max_open_ms", "at least 5000"),
        ('[breaker]\noffline = "panic"', "breaker.offline", "must be degrade or fail"),
        ("[breaker]\noffline = false", "breaker.offline", "must be"),
        ("[breaker]\nthreshold = 3", "breaker.threshold", "is not a known key"),
        ("breaker = []", "breaker", "must be a table"),
    ],
)
def test_a_bad_outbox_or_breaker_value_is_reported_with_its_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, f'site = "a"\n{text}\n'))
    assert info.value.key == key
    assert problem in str(info.value)
    # the file, the dotted key, what is wrong: the shape of every config error
    separator = ": " if info.value.whole_table else " "
    assert str(info.value).startswith(f"{tmp_path / 'agent.toml'}: {key}{separator}")
    assert info.value.source == str(tmp_path / "agent.toml")


def test_outbox_and_breaker_configs_built_in_code_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"outbox\.max_items"):
        OutboxConfig(max_items=0)
    with pytest.raises(ConfigError, match=r"outbox\.path must be a path"):
        OutboxConfig(path=3)  # type: ignore[arg-type]
    assert OutboxConfig(path="x/outbox.db").path == Path("x/outbox.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"breaker\.offline"):
        BreakerConfig(offline="ignore")
    with pytest.raises(ConfigError, match=r"^outbox must be OutboxConfig"):
        AgentConfig(site="a", outbox={"max_items": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^breaker must be BreakerConfig"):
        AgentConfig(site="a", breaker=None)  # type: ignore[arg-type]


def test_sync_section_is_read_and_checked(tmp_path: Path) -> None:
    from fogline.edge_agent._config import load_config as load

    conf = tmp_path / "agent.toml"
    conf.write_text('site = "a"\n[sync]\nstate_dir = "st"\nurl = "https://sync.example/"\n')
    sync = load(conf).sync
    assert sync is not None
    assert sync.state_dir == tmp_path / "st"
    assert (sync.url, sync.poll_s, sync.report_s) == ("https://sync.example", 300.0, 60.0)
    assert sync.director_url == "https://sync.example/sync/director"
    assert load(None, {"site": "a"}).sync is None
    for body, message in (
        ('[sync]\nurl = "https://x"\n', "sync.state_dir is required"),
        ('[sync]\nstate_dir = "s"\n', "sync.url is required"),
        ('[sync]\nstate_dir = "s"\nurl = "ftp://x"\n', "sync.url must be an http"),
        ('[sync]\nstate_dir = "s"\nurl = "http://x"\npoll_s = 0\n', "sync.poll_s must be"),
        ('[sync]\nstate_dir = "s"\nurl = "http://x"\npoll = 1\n', "sync.poll is not a known"),
    ):
        conf.write_text('site = "a"\n' + body)
        with pytest.raises(ConfigError, match=message):
            load(conf)
