"""The messaging package's errors: one root, :class:`MessagingError`.

:class:`MqttError` is every failure of the broker connection. It carries the broker's or
paho's code (``code``, the number, and ``code_name``) and prints both. It splits into
bad data the caller gave (:class:`MqttBadDataError`, also a ``ValueError``), the broker
refusing (:class:`MqttRefusedError`, a CONNACK/SUBACK failure reason) and the transport
failing (:class:`MqttTransportError`: sockets, TLS, timeouts, a lost connection).
"""

from __future__ import annotations

__all__ = [
    "MessagingError",
    "MqttBadDataError",
    "MqttError",
    "MqttRefusedError",
    "MqttTransportError",
]


class MessagingError(Exception):
    """Root of every error the messaging package raises."""


class MqttError(MessagingError):
    """A connection to the broker could not be made or used.

    ``code`` is the paho error code or MQTT reason code behind it (``None`` when the
    failure has none, such as a timeout), ``code_name`` its name.
    """

    def __init__(self, message: str, *, code: int | None = None, code_name: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.code_name = code_name

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"{self.message} [code {self.code}: {self.code_name}]"


class MqttBadDataError(MqttError, ValueError):
    """What was handed to the connection is invalid (a topic, a QoS, an oversized payload)."""


class MqttRefusedError(MqttError):
    """The broker answered and refused (bad credentials, not authorised, unsupported
    protocol version, quota exceeded, …)."""


class MqttTransportError(MqttError):
    """The network, TLS or the broker's availability failed, or an answer did not come in
    time."""
