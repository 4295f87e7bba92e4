"""cloud.toml: defaults, every section, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline._cli_cloud import with_reference_bundle
from fogline.cloud_service import (
    BatchingConfig,
    CloudConfig,
    ConfigError,
    HttpConfig,
    StoreConfig,
)
from fogline.reference import BUNDLE_DIR


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    return path


def test_defaults_name_no_bundle_and_subscribe_to_a_shared_subscription() -> None:
    cfg = CloudConfig()
    assert cfg.bundles == ()  # the serve command fills in the reference bundle
    assert cfg.share_group == "fogline-cloud"
    assert cfg.batching == BatchingConfig(32, 2.0, 10_000)
    assert cfg.store.url == "sqlite:///fogline-results.db"
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8080)
    assert cfg.backend == "auto"
    assert cfg.worker_id
    assert cfg.mqtt_settings.client_id == f"fogline-cloud-{cfg.worker_id}"


def test_a_full_file_is_read_into_every_section(tmp_path: Path) -> None:
    (tmp_path / "bundles" / "b1").mkdir(parents=True)
    (tmp_path / "ca.pem").write_text("x")
    path = write(
        tmp_path,
        """
        share_group = "workers"
        bundles = ["bundles/b1", "/abs/b2"]
        backend = "onnxruntime"
        worker_id = "w-7"
        threads = 2

        [broker]
        url = "mqtts://user:secret@broker.example:8884"
        protocol = "5"
        topic_prefix = "acme/v1"
        ca_file = "ca.pem"

        [batching]
        max_batch_size = 16
        max_queue_delay_ms = 1
        max_queue_items = 500

        [store]
        url = "postgresql+psycopg://fogline@db/fogline"

        [http]
        host = "0.0.0.0"
        port = 9000

        [tensorrt]
        engine_cache_dir = "/var/cache/engines"
        fp16 = true
        """,
    )
    cfg = CloudConfig.from_toml(path)
    assert cfg.share_group == "workers"
    assert cfg.bundles == (tmp_path / "bundles" / "b1", Path("/abs/b2"))
    assert cfg.backend == "onnxruntime"
    assert cfg.worker_id == "w-7"
    assert cfg.threads == 2
    b = cfg.broker
    assert (b.host, b.port, b.tls, b.username, b.password) == (
        "broker.example",
        8884,
        True,
        "user",
        "secret",
    )
    assert (b.protocol, b.topic_prefix) == ("5", "acme/v1")
    assert b.ca_file == str(tmp_path / "ca.pem")  # relative to the file
    assert cfg.batching == BatchingConfig(16, 1.0, 500)
    assert cfg.store == StoreConfig("postgresql+psycopg://fogline@db/fogline")
    assert cfg.http == HttpConfig("0.0.0.0", 9000)
    assert cfg.tensorrt.engine_cache_dir == Path("/var/cache/engines")
    assert cfg.tensorrt.fp16 is True
    assert "secret" not in repr(cfg)


def test_the_broker_may_be_a_plain_url(tmp_path: Path) -> None:
    cfg = CloudConfig.from_toml(write(tmp_path, 'broker = "mqtt://10.0.0.5:1999"'))
    assert (cfg.broker.host, cfg.broker.port) == ("10.0.0.5", 1999)


def test_broker_fields_without_a_url(tmp_path: Path) -> None:
    cfg = CloudConfig.from_toml(
        write(tmp_path, '[broker]\nhost = "b"\nport = 1884\nusername = "u"\npassword = "p"')
    )
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.username) == ("b", 1884, "u")


def test_an_empty_share_group_subscribes_to_the_plain_topic(tmp_path: Path) -> None:
    cfg = CloudConfig.from_toml(write(tmp_path, 'share_group = ""'))
    assert cfg.share_group is None
    assert CloudConfig(share_group="").share_group is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[batching]\nmax_batch_size = 0", "batching.max_batch_size must be at least 1"),
        ('[batching]\nmax_batch_size = "8"', "batching.max_batch_size must be an integer"),
        ("[batching]\nmax_batch_size = true", "batching.max_batch_size must be an integer"),
        ("[batching]\nmax_queue_delay_ms = -1", "batching.max_queue_delay_ms must lie in"),
        (
            "[batching]\nmax_batch_size = 64\nmax_queue_items = 10",
            r"batching.max_queue_items \(10\) must be at least max_batch_size \(64\)",
        ),
        ("[batching]\nsize = 3", "batching.size is not a known key"),
        ("colour = 3", "colour is not a known key"),
        ('backend = "cuda"', "backend must be one of auto, onnxruntime, tensorrt"),
        ("threads = -1", "threads must be 0"),
        ("bundles = []", "bundles must name at least one"),
        ("bundles = [3]", r"bundles\[0\] must be a directory path"),
        ('share_group = "a/b"', "share_group 'a/b' must not contain"),
        ("[http]\nport = 70000", "http.port must be at most 65535, got 70000"),
        ('[store]\nurl = "results.db"', "store.url 'results.db' is not a database URL"),
        ('[broker]\nurl = "http://x"', "broker.url is invalid: .* must start with mqtt://"),
        ("[broker]\nport = 0", "broker.port must be at least 1, got 0"),
        ('[broker]\nprotocol = "4"', 'broker.protocol must be "3.1.1" or "5", got \'4\''),
        ("[broker]\nqos = 2", "broker.qos is not a known key"),
        ('[broker]\ncert_file = "nope.pem"', "broker.cert_file names a file that does not exist"),
        ("batching = 3", "batching must be a table"),
        ("x = [", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        CloudConfig.from_toml(path)
    assert str(path) in str(err.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CloudConfig.from_toml(tmp_path / "nope.toml")


def test_command_line_overrides_replace_only_what_they_name(tmp_path: Path) -> None:
    base = CloudConfig.from_toml(
        write(tmp_path, '[broker]\nhost = "a"\ntopic_prefix = "t/v1"\n[http]\nport = 9000')
    )
    cfg = base.with_overrides(
        broker_url="mqtt://b:1999", bundles=(tmp_path,), http_host="0.0.0.0", store_url="sqlite://"
    )
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.topic_prefix) == ("b", 1999, "t/v1")
    assert cfg.bundles == (tmp_path,)
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9000)
    assert cfg.store.url == "sqlite://"
    with pytest.raises(ConfigError, match="mqtt://"):
        base.with_overrides(broker_url="ftp://x")


def test_the_serve_command_serves_the_reference_bundle_when_none_is_configured(
    tmp_path: Path,
) -> None:
    assert with_reference_bundle(CloudConfig()).bundles == (BUNDLE_DIR,)
    assert with_reference_bundle(CloudConfig(bundles=(tmp_path,))).bundles == (tmp_path,)
    from_file = CloudConfig.from_toml(write(tmp_path, 'backend = "onnxruntime"'))
    assert with_reference_bundle(from_file).bundles == (BUNDLE_DIR,)


def test_configs_are_frozen() -> None:
    cfg = CloudConfig()
    with pytest.raises(AttributeError):
        cfg.threads = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sqlite:///results.db", "sqlite:///{dir}/results.db"),
        ("sqlite:///data/results.db?timeout=5", "sqlite:///{dir}/data/results.db?timeout=5"),
        ("sqlite+pysqlite:///r.db", "sqlite+pysqlite:///{dir}/r.db"),
        ("sqlite:////var/lib/fogline/results.db", "sqlite:////var/lib/fogline/results.db"),
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+psycopg://fogline@db/fogline", "postgresql+psycopg://fogline@db/fogline"),
    ],
)
def test_a_relative_sqlite_store_follows_the_config_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str, expected: str
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "cloud.toml"
    path.write_text(f'[store]\nurl = "{written}"\n')
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    cfg = CloudConfig.from_toml(path)
    assert cfg.store.url == expected.format(dir=conf_dir)


def test_the_shipped_systemd_unit_keeps_the_default_store_in_its_state_directory() -> None:
    unit = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "fogline-cloud.service"
    settings = dict(
        line.split("=", 1)
        for line in unit.read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    assert settings["WorkingDirectory"] == f"/var/lib/{settings['StateDirectory']}"
    assert CloudConfig().store.url == "sqlite:///fogline-results.db"  # relative: in the working dir


def test_a_sync_table_names_the_home_and_defaults_the_store_to_the_rollout_commands(
    tmp_path: Path,
) -> None:
    cfg = CloudConfig.from_toml(write(tmp_path, '[sync]\nhome = "sync-home"\n'))
    assert cfg.sync is not None
    assert cfg.sync.home == tmp_path / "sync-home"  # relative to the file
    assert cfg.sync.tick_s == 5.0
    # what `fogline rollout` uses without --store, so both share one store
    assert cfg.sync.store_url == f"sqlite:///{tmp_path / 'sync-home' / 'fleet.db'}"
    full = CloudConfig.from_toml(
        write(tmp_path, '[sync]\nhome = "/h"\nstore = "sqlite:///f.db"\ntick_s = 0.5\n')
    )
    assert full.sync is not None
    assert full.sync.store_url == f"sqlite:///{tmp_path / 'f.db'}"
    assert full.sync.tick_s == 0.5
    assert full.sync.keys is None  # <home>/keys, as the sync commands
    apart = CloudConfig.from_toml(write(tmp_path, '[sync]\nhome = "h"\nkeys = "online-keys"\n'))
    assert apart.sync is not None
    assert apart.sync.keys == tmp_path / "online-keys"  # relative to the file
    assert CloudConfig().sync is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sync]\n", "sync.home is required"),
        ('[sync]\nhome = "h"\ntick_s = 0\n', "sync.tick_s must lie in"),
        ('[sync]\nhome = "h"\ntick_s = "5"\n', "sync.tick_s must be"),
        ('[sync]\nhome = "h"\nstore = "fleet.db"\n', "is not a database URL"),
        ('[sync]\nhome = "h"\nkeys = ""\n', "sync.keys must be a directory path"),
        ('[sync]\nhome = "h"\nkeys = 3\n', "sync.keys must be"),
        ('[sync]\nhome = "h"\nsecret = "k"\n', "sync.secret is not a known key"),
        ('sync = "h"\n', "sync must be a table"),
    ],
)
def test_a_bad_sync_table_is_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        CloudConfig.from_toml(write(tmp_path, text))


def test_sync_overrides_need_a_sync_home(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need --sync-home"):
        CloudConfig().with_overrides(sync_tick_s=1.0)
    cfg = CloudConfig().with_overrides(sync_home=tmp_path, sync_tick_s=1.0, sync_store="sqlite://")
    assert cfg.sync is not None
    assert (cfg.sync.home, cfg.sync.tick_s, cfg.sync.store_url) == (tmp_path, 1.0, "sqlite://")
