"""Typed envelope metadata: what a RESULT's and a FEATURES envelope's meta JSON mean.

The envelope carries meta as a small JSON object (``docs/wire-format.md``). These frozen
value objects are its contract: each validates itself on construction, ``from_meta``
decodes a received object once at the boundary (raising :class:`MetaError` naming the bad
key), and ``to_meta`` gives back the very keys and values senders of this release put on
the wire, so old and new agents and workers interoperate. Unknown keys are ignored, so a
later release may add some.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fogline.compression.errors import MetaError

__all__ = ["MAX_ERROR_CHARS", "MAX_WORKER_CHARS", "FeatureMeta", "ResultMeta", "ResultStatus"]

MAX_WORKER_CHARS = 255
MAX_ERROR_CHARS = 4096
# A day: longer than any sane back-off, short enough that a bad value cannot park an item.
MAX_RETRY_AFTER_MS = 86_400_000


class ResultStatus(enum.StrEnum):
    """What a RESULT envelope says about the item it answers."""

    OK = "ok"  # answered: label and confidence
    BUSY = "busy"  # refused for now: re-send after retry_after_ms
    ERROR = "error"  # failed for good: error says why


_STATUSES = {s.value: s for s in ResultStatus}


def _opt_str(key: str, value: object, max_chars: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise MetaError(key, f"{value!r} is not a string")
    if len(value) > max_chars:
        raise MetaError(key, f"{len(value)} characters, at most {max_chars} allowed")


def _opt_int(key: str, value: object, hi: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetaError(key, f"{value!r} is not an integer")
    if not 0 <= value <= hi:
        raise MetaError(key, f"{value} is outside 0..{hi}")


def _opt_float(key: str, value: object, *, non_negative: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, float):
        raise MetaError(key, f"{value!r} is not a number")
    if not math.isfinite(value):
        raise MetaError(key, f"{value!r} is not finite")
    if non_negative and value < 0:
        raise MetaError(key, f"{value!r} is negative")


def _number(value: Any) -> Any:
    """JSON numbers as floats (``1`` and ``1.0`` mean the same); anything else as is, for
    the field's own check to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True, slots=True)
class ResultMeta:
    """The meta of a RESULT envelope.

    ``ok`` requires ``label`` (a class index ≥ 0) and ``confidence``; ``busy`` may carry
    ``retry_after_ms`` (``None``: the agent's own back-off); ``error`` requires ``error``.
    A field that belongs to another status is refused. ``worker`` names who answered,
    ``queue_ms`` / ``compute_ms`` how long the item waited and ran, ``duplicate`` that an
    ``ok`` answer is one given before (the item was re-sent).
    """

    status: ResultStatus
    worker: str | None = None
    label: int | None = None
    confidence: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    retry_after_ms: int | None = None
    error: str | None = None
    duplicate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.status, ResultStatus):
            raise MetaError("status", f"{self.status!r} is not a ResultStatus")
        _opt_str("worker", self.worker, MAX_WORKER_CHARS)
        _opt_int("label", self.label, 2**31 - 1)
        _opt_float("confidence", self.confidence, non_negative=False)
        _opt_float("queue_ms", self.queue_ms, non_negative=True)
        _opt_float("compute_ms", self.compute_ms, non_negative=True)
        _opt_int("retry_after_ms", self.retry_after_ms, MAX_RETRY_AFTER_MS)
        _opt_str("error", self.error, MAX_ERROR_CHARS)
        if not isinstance(self.duplicate, bool):
            raise MetaError("duplicate", f"{self.duplicate!r} is not a boolean")
        ok = self.status is ResultStatus.OK
        if ok and self.label is None:
            raise MetaError("label", "an ok result needs a label")
        if ok and self.confidence is None:
            raise MetaError("confidence", "an ok result needs a confidence")
        if self.status is ResultStatus.ERROR and not self.error:
            raise MetaError("error", "an error result needs an error message")
        for key, present, allowed in (
            ("label", self.label is not None, ok),
            ("confidence", self.confidence is not None, ok),
            ("queue_ms", self.queue_ms is not None, ok),
            ("compute_ms", self.compute_ms is not None, ok),
            ("duplicate", self.duplicate, ok),
            ("retry_after_ms", self.retry_after_ms is not None, self.status is ResultStatus.BUSY),
            ("error", self.error is not None, self.status is ResultStatus.ERROR),
        ):
            if present and not allowed:
                raise MetaError(key, f"not allowed in a {self.status} result")

    @classmethod
    def ok(
        cls,
        label: int,
        confidence: float,
        *,
        worker: str | None = None,
        queue_ms: float | None = None,
        compute_ms: float | None = None,
        duplicate: bool = False,
    ) -> ResultMeta:
        return cls(
            ResultStatus.OK,
            worker,
            label,
            confidence,
            queue_ms,
            compute_ms,
            duplicate=duplicate,
        )

    @classmethod
    def busy(cls, retry_after_ms: int | None, *, worker: str | None = None) -> ResultMeta:
        return cls(ResultStatus.BUSY, worker, retry_after_ms=retry_after_ms)

    @classmethod
    def failed(cls, error: str, *, worker: str | None = None) -> ResultMeta:
        """An ``error`` result; a message longer than the bound is cut to fit."""
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 1] + "…"
        return cls(ResultStatus.ERROR, worker, error=error or "unspecified error")

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ResultMeta:
        """Decode a received meta object; :class:`MetaError` names the first bad key."""
        status = meta.get("status")
        status_e = _STATUSES.get(status) if isinstance(status, str) else None
        if status_e is None:
            raise MetaError("status", f"{status!r} is not one of ok, busy, error")
        duplicate = meta.get("duplicate", False)
        return cls(
            status_e,
            meta.get("worker"),
            meta.get("label"),
            _number(meta.get("confidence")),
            _number(meta.get("queue_ms")),
            _number(meta.get("compute_ms")),
            meta.get("retry_after_ms"),
            meta.get("error"),
            duplicate,
        )

    def to_meta(self) -> dict[str, Any]:
        """The JSON object for the wire: absent fields are left out, as is ``duplicate``
        when false."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.worker is not None:
            out["worker"] = self.worker
        if self.label is not None:
            out["label"] = self.label
        if self.confidence is not None:
            out["confidence"] = self.confidence
        if self.queue_ms is not None:
            out["queue_ms"] = self.queue_ms
        if self.compute_ms is not None:
            out["compute_ms"] = self.compute_ms
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        if self.error is not None:
            out["error"] = self.error
        if self.duplicate:
            out["duplicate"] = True
        return out


_DECISIONS = frozenset({"forward"})


@dataclass(frozen=True, slots=True)
class FeatureMeta:
    """The meta of a FEATURES envelope: the edge's ``decision`` (always ``forward`` for an
    item that travels), and, where the bundle has them, the filter's ``relevance`` and the
    early exit's ``exit_confidence`` for this item (finite numbers)."""

    decision: str = "forward"
    relevance: float | None = None
    exit_confidence: float | None = None

    def __post_init__(self) -> None:
        if self.decision not in _DECISIONS:
            raise MetaError("decision", f"{self.decision!r} is not one of forward")
        _opt_float("relevance", self.relevance, non_negative=False)
        _opt_float("exit_confidence", self.exit_confidence, non_negative=False)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> FeatureMeta:
        """Decode a received meta object; :class:`MetaError` names the first bad key."""
        decision = meta.get("decision", "forward")
        if not isinstance(decision, str):
            raise MetaError("decision", f"{decision!r} is not a string")
        return cls(
            decision,
            _number(meta.get("relevance")),
            _number(meta.get("exit_confidence")),
        )

    def to_meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"decision": self.decision}
        if self.relevance is not None:
            out["relevance"] = self.relevance
        if self.exit_confidence is not None:
            out["exit_confidence"] = self.exit_confidence
        return out
