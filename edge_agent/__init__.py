"""The edge agent: run a bundle's edge model, decide per input, forward features over MQTT.

Per input: the filter head may **drop** it (nothing leaves the site), the early-exit head
may answer it at the **edge**, otherwise its features go to the **cloud**: stored in a
durable outbox, published, re-sent until answered. :class:`Agent` is the Python API
(``await agent.infer(x)``, ``agent.submit(x)``, ``agent.submit_batch(xs)``);
:func:`create_app` is the local HTTP API over it; ``fogline agent run --config
agent.toml`` runs both as a service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fogline.edge_agent.errors import (
    AgentDataError,
    AgentError,
    AgentPeerError,
    BrokerError,
    CloudBusyError,
    CloudFailedError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    InputError,
    ModelError,
    NotRunningError,
    OutboxCorruptError,
    OutboxError,
    OutboxEvictedError,
    OutboxInUseError,
    OutboxQuarantinedError,
    OutboxStorageFullError,
    OutboxTransientError,
    OverloadedError,
    UpdateError,
    UpdateLockedError,
)

if TYPE_CHECKING:
    from fogline.edge_agent._agent import Agent, Answer, Delivery, Source
    from fogline.edge_agent._api import create_app
    from fogline.edge_agent._config import (
        AgentConfig,
        BreakerConfig,
        HttpConfig,
        OutboxConfig,
        RuntimeConfig,
        SyncConfig,
        load_config,
    )
    from fogline.edge_agent._pipeline import (
        BatchDecision,
        Decision,
        ItemDecision,
        decide_batch,
        decide_item,
    )
    from fogline.edge_agent._runtime import InputSpec

# The package is imported by ``fogline --help`` (through the agent's command module);
# onnxruntime and FastAPI load only when one of these names is first used.
_LAZY = {
    "Agent": "_agent",
    "Answer": "_agent",
    "Delivery": "_agent",
    "Source": "_agent",
    "create_app": "_api",
    "AgentConfig": "_config",
    "BreakerConfig": "_config",
    "OutboxConfig": "_config",
    "HttpConfig": "_config",
    "RuntimeConfig": "_config",
    "SyncConfig": "_config",
    "load_config": "_config",
    "InputSpec": "_runtime",
    # The decision rule (drop, answer at the edge, forward), for anyone who must decide
    # exactly as the agent does: the reference build measures its bundle with it.
    "BatchDecision": "_pipeline",
    "Decision": "_pipeline",
    "ItemDecision": "_pipeline",
    "decide_batch": "_pipeline",
    "decide_item": "_pipeline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Agent",
    "AgentConfig",
    "AgentDataError",
    "AgentError",
    "AgentPeerError",
    "Answer",
    "BatchDecision",
    "BreakerConfig",
    "BrokerError",
    "CloudBusyError",
    "CloudFailedError",
    "CloudTimeoutError",
    "CloudUnavailableError",
    "ConfigError",
    "Decision",
    "Delivery",
    "HttpConfig",
    "InputError",
    "InputSpec",
    "ItemDecision",
    "ModelError",
    "NotRunningError",
    "OutboxConfig",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxEvictedError",
    "OutboxInUseError",
    "OutboxQuarantinedError",
    "OutboxStorageFullError",
    "OutboxTransientError",
    "OverloadedError",
    "RuntimeConfig",
    "Source",
    "SyncConfig",
    "UpdateError",
    "UpdateLockedError",
    "create_app",
    "decide_batch",
    "decide_item",
    "load_config",
]
