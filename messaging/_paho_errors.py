"""The one place a paho-mqtt, OS or timeout failure becomes a :class:`MqttError`."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.client import MalformedPacket  # type: ignore[attr-defined]
from paho.mqtt.enums import ConnackCode, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from .errors import (
    MqttBadDataError,
    MqttError,
    MqttRefusedError,
    MqttTransportError,
)

__all__ = ["error_for_code", "mapped_errors"]

# paho's own error codes, by the kind of failure they report.
_BAD_DATA = {
    MQTTErrorCode.MQTT_ERR_INVAL,
    MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE,
    MQTTErrorCode.MQTT_ERR_NOT_SUPPORTED,
    MQTTErrorCode.MQTT_ERR_NOT_FOUND,
    MQTTErrorCode.MQTT_ERR_QUEUE_SIZE,
}
_REFUSED = {
    MQTTErrorCode.MQTT_ERR_CONN_REFUSED,
    MQTTErrorCode.MQTT_ERR_AUTH,
    MQTTErrorCode.MQTT_ERR_ACL_DENIED,
}
# MQTT 5 reason codes that blame what the client sent rather than the broker's will.
_BAD_DATA_REASONS = {
    "Malformed packet",
    "Protocol error",
    "Topic Name invalid",
    "Topic filter invalid",
    "Packet too large",
    "Payload format invalid",
    "Message too large",
}
_TRANSPORT_REASONS = {"Server unavailable", "Server busy", "Server shutting down"}


def error_for_code(code: MQTTErrorCode | ConnackCode | ReasonCode | int, message: str) -> MqttError:
    """The :class:`MqttError` for a failing paho error code, 3.1.1 CONNACK code or MQTT 5
    reason code, carrying the code and its name."""
    if isinstance(code, ReasonCode):
        name = str(code.getName())
        value = int(code.value)
        if name in _BAD_DATA_REASONS:
            return MqttBadDataError(message, code=value, code_name=name)
        if name in _TRANSPORT_REASONS:
            return MqttTransportError(message, code=value, code_name=name)
        return MqttRefusedError(message, code=value, code_name=name)
    if isinstance(code, ConnackCode):
        name = mqtt.connack_string(code)
        if code == ConnackCode.CONNACK_REFUSED_SERVER_UNAVAILABLE:
            return MqttTransportError(message, code=int(code), code_name=name)
        return MqttRefusedError(message, code=int(code), code_name=name)
    try:
        rc = MQTTErrorCode(int(code))
    except ValueError:
        return MqttTransportError(message, code=int(code), code_name="unknown error code")
    name = f"{rc.name}: {mqtt.error_string(rc)}"
    if rc in _BAD_DATA:
        return MqttBadDataError(message, code=int(rc), code_name=name)
    if rc in _REFUSED:
        return MqttRefusedError(message, code=int(rc), code_name=name)
    return MqttTransportError(message, code=int(rc), code_name=name)


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Run a paho call; turn whatever it raises into a :class:`MqttError` that says
    ``what`` was being done. A :class:`MqttError` passes through unchanged."""
    try:
        yield
    except MqttError:
        raise
    except mqtt.WebsocketConnectionError as exc:
        raise MqttTransportError(f"{what}: websocket handshake failed: {exc}") from exc
    except MalformedPacket as exc:
        code = error_for_code(MQTTErrorCode.MQTT_ERR_PROTOCOL, "")
        raise MqttTransportError(
            f"{what}: malformed packet from the broker: {exc}",
            code=code.code,
            code_name=code.code_name,
        ) from exc
    except ssl.SSLError as exc:
        code = error_for_code(MQTTErrorCode.MQTT_ERR_TLS, "")
        raise MqttTransportError(
            f"{what}: TLS failed: {exc}", code=code.code, code_name=code.code_name
        ) from exc
    except TimeoutError as exc:
        raise MqttTransportError(f"{what}: timed out: {exc}") from exc
    except OSError as exc:
        code = error_for_code(MQTTErrorCode.MQTT_ERR_ERRNO, "")
        raise MqttTransportError(
            f"{what}: {exc}", code=code.code, code_name=code.code_name
        ) from exc
    except (ValueError, TypeError) as exc:
        code = error_for_code(MQTTErrorCode.MQTT_ERR_INVAL, "")
        raise MqttBadDataError(f"{what}: {exc}", code=code.code, code_name=code.code_name) from exc
    except RuntimeError as exc:
        raise MqttTransportError(f"{what}: {exc}") from exc
