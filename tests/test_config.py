"""The shared TOML reader and the one [broker] parser: types, unknown keys, paths, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fogline._config import ConfigValueError, Section, broker_settings, load_toml
from fogline._mqtt import MqttSettings


def broker(table: dict[str, Any], base_dir: Path | None = None) -> MqttSettings:
    return broker_settings(Section(table, "broker", base_dir=base_dir))


def test_typed_reads_return_values_and_name_the_dotted_key_when_wrong() -> None:
    sec = Section({"port": "x", "n": 3, "flag": True, "name": "a"}, "broker")
    assert sec.get("n", int) == 3
    assert sec.get("n", float) == 3.0
    assert isinstance(sec.get("n", float), float)
    assert sec.get("flag", bool) is True
    assert sec.get("name", str) == "a"
    assert sec.get("absent", int) is None
    with pytest.raises(ConfigValueError) as info:
        sec.get("port", int)
    assert str(info.value) == "broker.port must be an integer, got 'x'"
    assert (info.value.key, info.value.problem) == ("broker.port", "must be an integer, got 'x'")


@pytest.mark.parametrize("kind", [int, float])
def test_a_boolean_never_passes_for_a_number(kind: type) -> None:
    with pytest.raises(ConfigValueError, match=r"^flag must be an? .*, got True$"):
        Section({"flag": True}).get("flag", kind)


def test_numbers_are_checked_against_their_bounds() -> None:
    sec = Section({"low": 0, "high": 70000}, "http")
    assert sec.get("low", int, minimum=0) == 0
    with pytest.raises(ConfigValueError, match=r"^http\.low must be at least 1, got 0$"):
        sec.get("low", int, minimum=1)
    with pytest.raises(ConfigValueError, match=r"^http\.high must be at most 65535, got 70000$"):
        sec.get("high", int, maximum=65535)


def test_keys_nobody_read_are_refused_as_unknown() -> None:
    top = Section({"site": "a", "sitee": "b", "http": {"port": 1, "prot": 2}})
    top.get("site", str)
    http = top.table("http")
    http.read({"port": int})
    with pytest.raises(ConfigValueError, match=r"^http\.prot is not a known key$"):
        http.done()
    with pytest.raises(ConfigValueError, match=r"^sitee is not a known key$"):
        top.done()


def test_an_absent_table_reads_as_empty_and_a_scalar_is_not_a_table() -> None:
    top = Section({"batching": 3})
    empty = top.table("store")
    assert empty.read({"url": str}) == {}
    empty.done()
    with pytest.raises(ConfigValueError, match=r"^batching must be a table$"):
        top.table("batching")


def test_relative_paths_are_taken_from_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    sec = Section(
        {"rel": "ca.pem", "abs": "/etc/x", "home": "~/y", "missing": "no.pem"},
        "broker",
        base_dir=tmp_path,
    )
    assert sec.path("rel") == tmp_path / "ca.pem"
    assert sec.path("abs") == Path("/etc/x")
    assert sec.path("home") == Path.home() / "y"
    assert sec.file("rel") == tmp_path / "ca.pem"
    with pytest.raises(
        ConfigValueError, match=r"^broker\.missing names a file that does not exist: .*no\.pem$"
    ):
        sec.file("missing")
    assert Section({"rel": "a/b"}).path("rel") == Path("a/b")  # no base: left relative


@dataclass(frozen=True)
class _Limits:
    size: int = 1
    cap: int = 2

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {self.size}")
        if self.cap < self.size:
            raise ValueError("the cap may not be below the size")


def test_build_names_the_field_a_validator_complains_about() -> None:
    sec = Section({}, "limits")
    assert sec.build(_Limits, {"size": 2, "cap": 3}) == _Limits(2, 3)
    with pytest.raises(ConfigValueError) as info:
        sec.build(_Limits, {"size": 0})
    assert str(info.value) == "limits.size must be at least 1, got 0"
    with pytest.raises(ConfigValueError) as info:
        sec.build(_Limits, {"size": 5, "cap": 3})
    assert str(info.value) == "limits: the cap may not be below the size"
    assert info.value.key == "limits"


def test_a_broker_url_sets_everything_and_explicit_keys_win(tmp_path: Path) -> None:
    s = broker({"url": "mqtts://user:secret@broker.example:8884", "port": 9999, "username": "u2"})
    assert (s.host, s.port, s.tls, s.username, s.password) == (
        "broker.example",
        9999,
        True,
        "u2",
        "secret",
    )
    assert broker({}) == MqttSettings()


def test_every_broker_key_is_read(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    s = broker(
        {
            "host": "h",
            "port": 1884,
            "client_id": "c",
            "username": "u",
            "password": "p",
            "tls": True,
            "ca_file": "ca.pem",
            "cert_file": "cert.pem",
            "key_file": str(tmp_path / "key.pem"),
            "tls_insecure": True,
            "protocol": 5,
            "keepalive_s": 15,
            "reconnect_min_s": 2,
            "reconnect_max_s": 4,
            "connect_timeout_s": 3,
            "clean_start": False,
            "topic_prefix": "acme/v1",
        },
        base_dir=tmp_path,
    )
    assert s == MqttSettings(
        host="h",
        port=1884,
        client_id="c",
        username="u",
        password="p",
        tls=True,
        ca_file=str(tmp_path / "ca.pem"),
        cert_file=str(tmp_path / "cert.pem"),
        key_file=str(tmp_path / "key.pem"),
        tls_insecure=True,
        protocol="5",
        keepalive_s=15,
        reconnect_min_s=2,
        reconnect_max_s=4,
        connect_timeout_s=3.0,
        clean_start=False,
        topic_prefix="acme/v1",
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"port": "x"}, "broker.port must be an integer, got 'x'"),
        ({"port": 0}, "broker.port must be at least 1, got 0"),
        ({"port": 70000}, "broker.port must be at most 65535, got 70000"),
        ({"host": ""}, "broker.host must not be empty"),
        ({"tls": "yes"}, "broker.tls must be true or false, got 'yes'"),
        ({"protocol": "4"}, 'broker.protocol must be "3.1.1" or "5", got \'4\''),
        ({"protocol": True}, 'broker.protocol must be "3.1.1" or "5", got True'),
        ({"connect_timeout_s": 0}, "broker.connect_timeout_s must be positive, got 0.0"),
        ({"keepalive_s": 0}, "broker.keepalive_s must be at least 1"),
        ({"qos": 1}, "broker.qos is not a known key"),
        ({"ca_file": "nope.pem"}, "broker.ca_file names a file that does not exist: "),
        (
            {"reconnect_min_s": 5, "reconnect_max_s": 1},
            "broker: reconnect backoff must satisfy 0 < reconnect_min_s <= reconnect_max_s",
        ),
        ({"topic_prefix": "a/#"}, "broker: topic prefix 'a/#' must be non-empty, no wildcards"),
    ],
)
def test_a_bad_broker_table_is_refused_naming_the_key(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigValueError) as info:
        broker(table, base_dir=tmp_path)
    assert str(info.value).startswith(message)


def test_a_bad_broker_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigValueError) as info:
        broker({"url": "http://agent:s3cret@broker.example"})
    text = str(info.value)
    assert text.startswith("broker.url is invalid: ")
    assert "mqtt://" in text
    assert "agent:***@broker.example" in text
    assert "s3cret" not in text


def test_a_config_file_is_read_or_named_in_the_error(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('site = "a"\n[broker]\nport = 1884\n')
    assert load_toml(good) == {"site": "a", "broker": {"port": 1884}}
    bad = tmp_path / "bad.toml"
    bad.write_text("site = \n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"site = '\xff'\n")
    for path, problem in (
        (tmp_path / "missing.toml", "does not exist"),
        (bad, "not valid TOML at line 1, column 8: invalid value"),
        (binary, "is not UTF-8 text"),
        (tmp_path, "cannot be read: Is a directory"),
    ):
        with pytest.raises(ConfigValueError) as info:
            load_toml(path)
        assert str(info.value) == f"{path}: {problem}"
        assert (info.value.key, info.value.source) == ("", str(path))
