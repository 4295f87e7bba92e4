"""The public surface of fogline.edge_agent."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fogline.edge_agent as edge_agent
from fogline.edge_agent import errors

EXPECTED = {
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
}


def test_all_names_the_public_api_and_every_name_resolves() -> None:
    assert set(edge_agent.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(edge_agent, name) is not None
    with pytest.raises(AttributeError):
        _ = edge_agent.NoSuchThing  # type: ignore[attr-defined]


def test_errors_split_into_bad_data_and_failed_peers() -> None:
    for cls in (errors.ConfigError, errors.InputError, errors.ModelError):
        assert issubclass(cls, errors.AgentDataError)
        assert issubclass(cls, ValueError)
    for cls in (
        errors.BrokerError,
        errors.OverloadedError,
        errors.CloudTimeoutError,
        errors.CloudBusyError,
        errors.CloudFailedError,
        errors.CloudUnavailableError,
        errors.OutboxError,
        errors.OutboxEvictedError,
    ):
        assert issubclass(cls, errors.AgentPeerError)
        assert not issubclass(cls, errors.AgentDataError)
    assert all(issubclass(getattr(errors, n), errors.AgentError) for n in errors.__all__)


def test_the_command_module_does_not_load_onnxruntime_or_fastapi() -> None:
    code = (
        "import sys, fogline._cli_agent, fogline.edge_agent; "
        "print(sorted(m for m in ('onnxruntime', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
