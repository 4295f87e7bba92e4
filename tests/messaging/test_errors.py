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
            "ContainedHttp", "DEFAULT_TOPIC_PREFIX", "ConfigValueError", "Inbound",
            "InboundHandler",
            "MessageHandler", "MessagingError", "MqttBadDataError", "MqttConnection",
            "MqttError", "MqttRefusedError", "MqttSettings", "MqttTransportError", "Received",
            "Section", "Supervisor", "ThreadFailure", "ThreadFailures", "TlsSettings", "Topics",
            "broker_settings", "error_for_code",
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


def _module_name(path: Path) -> str:
    """The dotted name a component file is installed under (``fogline.edge_agent._api``)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["fogline", *parts])


def _is_root(module: str) -> bool:
    """Whether ``module`` is the root package or one of its own modules, as opposed to a
    component installed under the ``fogline.`` namespace."""
    parts = module.split(".")
    return parts[0] == "fogline" and (len(parts) == 1 or parts[1] not in COMPONENTS)


def root_imports_in(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every root-package module that ``source`` (the code of ``module``) imports: plain and
    ``from`` imports, relative ones resolved, and ``importlib.import_module("…")``."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from fogline import edge_agent` names a component; `from fogline import
            # __version__` (or `reference`, `cli`, `_cli`) names the root package's own.
            targets = [f"{base}.{a.name}" if base == "fogline" else base for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
        ):
            targets = [node.args[0].value]
        found.update(t for t in targets if _is_root(t))
    return found


def _root_imports() -> set[tuple[str, str]]:
    found = set()
    for package in COMPONENTS:
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            is_package = path.name == "__init__.py"
            for name in root_imports_in(source, _module_name(path), is_package=is_package):
                found.add((path.relative_to(REPO).as_posix(), name))
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import fogline",
        "import fogline._cli",
        "import fogline.reference as ref",
        "from fogline import __version__",
        "from fogline import reference",
        "from fogline import cli",
        "from fogline._cli import fail",
        "from fogline.reference import BUNDLE_DIR",
        "from fogline.reference._frames import make_frames",
        "from fogline.cli import app",
        "from .. import __version__",
        "from ..reference import BUNDLE_DIR",
        "def f():\n    from fogline._frames import make_frames",
        "import importlib\nimportlib.import_module('fogline._bench')",
    ],
)
def test_any_import_of_the_root_package_from_a_component_is_found(source: str) -> None:
    assert root_imports_in(source, "fogline.edge_agent._api")


@pytest.mark.parametrize(
    "source",
    [
        "import fogline.edge_agent",
        "from fogline import edge_agent, messaging",
        "from fogline.messaging import MqttSettings",
        "from fogline.sync import Bundle",
        "from . import errors",
        "from ._pipeline import decide_batch",
        "from ..compression import Codec",
    ],
)
def test_imports_of_components_are_not_root_imports(source: str) -> None:
    assert not root_imports_in(source, "fogline.edge_agent._api")


def test_no_component_imports_the_root_package() -> None:
    assert _root_imports() == set()
