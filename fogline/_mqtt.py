"""Moved to :mod:`fogline.messaging`; kept so existing imports keep working."""

from fogline.messaging import (
    DEFAULT_TOPIC_PREFIX,
    Inbound,
    MqttConnection,
    MqttError,
    MqttSettings,
    Topics,
    parse_broker_url,
)

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "Inbound",
    "MqttConnection",
    "MqttError",
    "MqttSettings",
    "Topics",
    "parse_broker_url",
]
