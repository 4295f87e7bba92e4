"""fogline.messaging: the MQTT connection, topic scheme and settings shared by the edge
agent and the cloud worker, with one error root (:class:`MessagingError`).

The thread supervisor (:class:`Supervisor`) lives here too: the agent and the cloud worker
supervise their threads alike, and this is the one package both import.

The settings-file helpers (:class:`Section`, :func:`load_toml`, :func:`broker_settings`)
live here too: the ``[broker]`` table is the one section every process reads, and the
generic helpers it is built on are the settings layer the components share.
"""

from ._config import ConfigValueError, Section, broker_settings, load_toml
from ._connection import Inbound, InboundHandler, MessageHandler, MqttConnection, Received
from ._paho_errors import error_for_code, mapped_errors
from ._reporting import ContainedHttp, ThreadFailures
from ._settings import MqttSettings, TlsSettings, parse_broker_url
from ._supervisor import Supervisor, ThreadFailure
from ._topics import DEFAULT_TOPIC_PREFIX, Topics
from .errors import (
    MessagingError,
    MqttBadDataError,
    MqttError,
    MqttRefusedError,
    MqttTransportError,
)

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "ConfigValueError",
    "ContainedHttp",
    "Inbound",
    "InboundHandler",
    "MessageHandler",
    "MessagingError",
    "MqttBadDataError",
    "MqttConnection",
    "MqttError",
    "MqttRefusedError",
    "MqttSettings",
    "MqttTransportError",
    "Received",
    "Section",
    "Supervisor",
    "ThreadFailure",
    "ThreadFailures",
    "TlsSettings",
    "Topics",
    "broker_settings",
    "error_for_code",
    "load_toml",
    "mapped_errors",
    "parse_broker_url",
]
