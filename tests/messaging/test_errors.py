"""Every paho-mqtt failure becomes the messaging package's own error."""

from __future__ import annotations

import ast
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import ConnackCode, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import fogline.messaging as messaging
from fogline.messaging import MessagingError, MqttError, error_for_code, mapped_errors

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("edge_agent", "cloud_service", "compression", "sync", "residency", "messaging")


def test_public_names_are_pinned() -> None:
    assert sorted(messaging.__all__) == sorted(
        [
            "DEFAULT_TOPIC_PREFIX", "ConfigValueError", "Inbound", "InboundHandler",
            "MessageHandler", "MessagingError", "MqttBadDataError", "MqttConnection",
            "MqttError", "MqttRefusedError", "MqttSettings", "MqttTransportError", "Received",
            "Section", "TlsSettings", "Topics", "broker_settings", "error_for_code",
            "load_toml", "mapped_errors", "parse_broker_url",
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    "code", [c for c in MQTTErrorCode if c not in (MQTTErrorCode.MQTT_ERR_SUCCESS,)]
)
def test_every_paho_error_code_maps_to_an_mqtt_error_naming_it(code: MQTTErrorCode) -> None:
    err = error_for_code(code, "publish")
    assert isinstance(err, MqttError)
    assert err.code == int(code)
    assert code.name in str(err)


@pytest.mark.parametrize("code", [c for c in ConnackCode if c != ConnackCode.CONNACK_ACCEPTED])
def test_every_refused_connack_maps_to_an_mqtt_error(code: ConnackCode) -> None:
    err = error_for_code(code, "connect")
    assert isinstance(err, MqttError)
    assert f"code {int(code)}" in str(err)


_CONNACK_FAILURES = [
    v
    for v, names in ReasonCode(PacketTypes.CONNACK).names.items()
    if v >= 0x80 and any(PacketTypes.CONNACK in kinds for kinds in names.values())
]


@pytest.mark.parametrize("value", _CONNACK_FAILURES)
def test_every_failing_reason_code_maps_to_an_mqtt_error(value: int) -> None:
    reason = ReasonCode(PacketTypes.CONNACK, identifier=value)
    err = error_for_code(reason, "connect")
    assert isinstance(err, MqttError)
    assert err.code == value
    assert reason.getName() in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        mqtt.WebsocketConnectionError("x"),
        mqtt.MalformedPacket("x"),  # type: ignore[attr-defined]
        TimeoutError("x"),
        ConnectionRefusedError("x"),
        OSError("x"),
        ValueError("x"),
        TypeError("x"),
        RuntimeError("x"),
    ],
)
def test_every_upstream_exception_becomes_a_messaging_error(exc: Exception) -> None:
    with pytest.raises(MessagingError) as caught, mapped_errors("doing it"):
        raise exc
    assert caught.value.__cause__ is exc


def test_paho_defines_no_exception_type_left_unmapped() -> None:
    paho_errors = {
        name for name, obj in vars(mqtt).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }  # fmt: skip
    assert paho_errors == {"MalformedPacket", "WebsocketConnectionError"}


# Imports of the root package still to be removed from components (issue 13, item 5).
KNOWN_ROOT_IMPORTS = {
    ("cloud_service/_app.py", "fogline"),
    ("cloud_service/_auth.py", "fogline._cli"),
    ("cloud_service/_batch_job.py", "fogline._cli"),
    ("cloud_service/_doctor.py", "fogline._cli"),
    ("cloud_service/_oip_app.py", "fogline"),
    ("cloud_service/cli.py", "fogline._cli"),
    ("compression/_reference.py", "fogline._frames"),
    ("compression/cli.py", "fogline._cli"),
    ("edge_agent/_api.py", "fogline"),
    ("edge_agent/cli.py", "fogline._cli"),
}


def _root_imports() -> set[tuple[str, str]]:
    found = set()
    for package in COMPONENTS:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for name in names:
                    if name == "fogline" or name.startswith("fogline._"):
                        found.add((path.relative_to(REPO).as_posix(), name))
    return found


def test_no_component_imports_the_root_package_beyond_known_work() -> None:
    found = _root_imports()
    assert not {m for _, m in found} & {"fogline._mqtt", "fogline._config"}
    assert found <= KNOWN_ROOT_IMPORTS, sorted(found - KNOWN_ROOT_IMPORTS)
