"""Errors of :mod:`fogline.edge_agent`: one root, split into bad data and failed peers.

Bad data (:class:`AgentDataError`, also a :class:`ValueError`) means the caller or the
operator handed the agent something unusable: a config key, an input, a bundle. Peer
failures (:class:`AgentPeerError`) mean the broker or the cloud did not deliver: the same
request may succeed later. :class:`NotRunningError` is a state error: the agent was not
started, or is stopping.
"""

from __future__ import annotations

from fogline.messaging import ConfigValueError

__all__ = [
    "AgentDataError",
    "AgentError",
    "AgentPeerError",
    "BrokerError",
    "CloudBusyError",
    "CloudFailedError",
    "CloudTimeoutError",
    "CloudUnavailableError",
    "ConfigError",
    "InputError",
    "ModelError",
    "NotRunningError",
    "OutboxCorruptError",
    "OutboxError",
    "OutboxEvictedError",
    "OutboxInUseError",
    "OutboxQuarantinedError",
    "OutboxStorageFullError",
    "OutboxTransientError",
    "OverloadedError",
    "UpdateError",
    "UpdateLockedError",
]


class AgentError(Exception):
    """Root of every error raised by :mod:`fogline.edge_agent`."""


class AgentDataError(AgentError, ValueError):
    """Something handed to the agent is unusable; retrying the same thing will not help."""


class ConfigError(AgentDataError):
    """A configuration value is invalid. ``key`` names it (dotted, as in ``agent.toml``),
    ``source`` the file it was read from, when known.

    The message has the one shape every fogline config error has (the cloud's too):
    ``agent.toml: http.port must be at most 65535, got 70000``.
    """

    def __init__(
        self, key: str, problem: str, *, source: str | None = None, whole_table: bool = False
    ) -> None:
        shaped = ConfigValueError(key, problem, source=source, whole_table=whole_table)
        super().__init__(str(shaped))
        self.key = key
        self.problem = problem
        self.source = source
        self.whole_table = whole_table


class InputError(AgentDataError):
    """An input does not fit the edge model (shape, dtype, values)."""


class ModelError(AgentDataError):
    """The bundle or its edge model cannot be used (missing file, tensor, bad manifest)."""


class NotRunningError(AgentError, RuntimeError):
    """The agent is not started, or stopped while the request was in flight."""


class AgentPeerError(AgentError):
    """The broker or the cloud failed to deliver; the same request may succeed later."""


class BrokerError(AgentPeerError):
    """No connection to the MQTT broker could be made."""


class OverloadedError(AgentPeerError):
    """Too many requests are queued or waiting for the cloud; shed instead of absorbed."""


class CloudTimeoutError(AgentPeerError):
    """A forwarded item got no answer from the cloud within ``cloud_timeout_ms``."""

    def __init__(self, message_id: str, timeout_ms: int) -> None:
        super().__init__(f"no answer from the cloud for {message_id} within {timeout_ms} ms")
        self.message_id = message_id
        self.timeout_ms = timeout_ms


class CloudBusyError(AgentPeerError):
    """The cloud refused the item because it is overloaded; retry after ``retry_after_ms``."""

    def __init__(self, message_id: str, retry_after_ms: int | None, worker: str | None) -> None:
        hint = f", retry after {retry_after_ms} ms" if retry_after_ms is not None else ""
        super().__init__(f"the cloud is busy and refused {message_id}{hint}")
        self.message_id = message_id
        self.retry_after_ms = retry_after_ms
        self.worker = worker


class CloudFailedError(AgentPeerError):
    """The cloud answered with an error, or with a result the agent cannot use."""

    def __init__(self, message_id: str, reason: str, worker: str | None = None) -> None:
        super().__init__(f"the cloud failed on {message_id}: {reason}")
        self.message_id = message_id
        self.reason = reason
        self.worker = worker


class CloudUnavailableError(AgentPeerError):
    """The caller was not made to wait: the broker is unreachable or the circuit breaker is
    open. The item is kept in the outbox; the cloud's answer goes to ``on_answer``."""

    def __init__(self, message_id: str, why: str) -> None:
        super().__init__(f"the cloud is unavailable for {message_id} ({why}); the item is kept")
        self.message_id = message_id
        self.why = why


class OutboxError(AgentPeerError):
    """The outbox could not store or read an item (disk full, unwritable or damaged file);
    an item it could not store was not sent. Every SQLite and file-system failure of the
    outbox becomes one of these (``fogline.edge_agent._journal``): the subclasses say which
    kind, this class itself means any other fault."""


class OutboxStorageFullError(OutboxError):
    """The disk, or the database file, is full (``SQLITE_FULL``, ``ENOSPC``), or so nearly
    full that the outbox refuses new items to keep room for deleting answered ones. The
    message starts with ``outbox storage full``; the HTTP API answers 507. Nothing stored
    before is lost, and new items are stored again as soon as there is room."""


class OutboxCorruptError(OutboxError):
    """The outbox file is damaged or not a database (``SQLITE_CORRUPT``,
    ``SQLITE_NOTADB``); retrying will not help."""


class OutboxQuarantinedError(OutboxCorruptError):
    """A forwarded item's outbox row was found damaged before it was sent again, and moved
    to the outbox file's ``quarantine`` table instead: it is never sent. ``reason`` is
    ``bad_row`` (a column of the wrong type or length), ``bad_envelope`` (the stored
    envelope does not decode: checksum, framing) or ``wrong_item`` (it names another
    message id, site or kind); ``detail`` says what was found."""

    def __init__(self, message_id: str, reason: str, detail: str) -> None:
        super().__init__(
            f"item {message_id} was quarantined, not sent: its outbox row is damaged "
            f"({reason}: {detail})"
        )
        self.message_id = message_id
        self.reason = reason
        self.detail = detail


class OutboxTransientError(OutboxError):
    """The outbox file was busy, locked or failed an I/O call; the same write may succeed
    later."""


class OutboxInUseError(OutboxError):
    """Another agent (or another outbox in this process) holds the outbox file: two
    agents with one configuration would hand each other's items out and take each other's
    MQTT session. The second one is refused at start."""


class OutboxEvictedError(AgentPeerError):
    """A forwarded item was evicted from the outbox by a configured bound before the cloud
    answered it; ``reason`` is ``max_items``, ``max_bytes`` or ``max_age``."""

    def __init__(self, message_id: str, reason: str) -> None:
        super().__init__(f"item {message_id} was evicted from the outbox ({reason})")
        self.message_id = message_id
        self.reason = reason


class UpdateError(AgentError):
    """The site's update could not go on: its state directory cannot be read or written,
    or the bundle it was told to run does not load. The agent keeps serving what it runs."""


class UpdateLockedError(UpdateError):
    """Another updater (a running agent, ``fogline agent update`` or an import) holds
    the site's update lock: one update at a time per site."""
