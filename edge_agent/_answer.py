"""What the agent hands out: an :class:`Answer` per input, a :class:`Delivery` per item no
caller waits for any more, and the decoding of the cloud's RESULT into them."""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fogline.compression import Envelope, ResultMeta
from fogline.edge_agent.errors import AgentError
from fogline.sync import Thresholds

__all__ = ["Answer", "Delivery", "Source", "result_meta", "settle"]

Source = Literal["dropped", "edge", "cloud"]
_DECISION_OF: dict[str, str] = {"dropped": "drop", "edge": "exit", "cloud": "forward"}


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer for one input and where it came from.

    ``source`` is ``dropped`` (the filter judged it empty: no label, nothing left the
    site), ``edge`` (the early-exit head was confident: its argmax and confidence) or
    ``cloud`` (the cloud's label and confidence). The decision inputs (``relevance``,
    ``exit_confidence``; ``None`` when the bundle lacks that head), the ``thresholds`` and
    the ``bundle`` id travel with it. ``latency_ms`` runs from the input's arrival at the
    agent to its answer. ``status`` is ``ok``, or ``degraded`` for a forwarded item the
    edge answered alone because the cloud did not answer in time (the cloud's answer
    follows through ``on_answer``). ``tag`` is the caller's own correlation string.
    """

    source: Source
    label: int | None
    confidence: float | None
    relevance: float | None
    exit_confidence: float | None
    thresholds: Thresholds
    bundle: str
    message_id: str | None
    latency_ms: float
    worker: str | None = None
    status: str = "ok"
    tag: str | None = None

    @property
    def decision(self) -> str:
        """The edge decision: ``drop``, ``exit`` or ``forward``."""
        return "forward" if self.status == "degraded" else _DECISION_OF[self.source]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "source": self.source,
            "decision": self.decision,
            "label": self.label,
            "confidence": self.confidence,
            "relevance": self.relevance,
            "exit_confidence": self.exit_confidence,
            "thresholds": {
                "relevance": self.thresholds.relevance,
                "exit_confidence": self.thresholds.exit_confidence,
            },
            "bundle": self.bundle,
            "message_id": self.message_id,
            "latency_ms": self.latency_ms,
            "worker": self.worker,
            "status": self.status,
            "tag": self.tag,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """The final outcome of a forwarded item no caller waits for any more (it timed out,
    was answered degraded, or was recovered from the outbox after a restart): the cloud's
    :class:`Answer`, or the error that ended it (:class:`CloudFailedError`,
    :class:`OutboxEvictedError`). One per item in each run of the agent.

    ``recovered`` marks an item found in the outbox at start-up. Its outcome may have
    been handed out already, just before the agent was killed (the outbox row is deleted
    only after the answer's callbacks returned), so an application that must see each
    item once checks these against what it kept, by ``tag`` or ``message_id``."""

    message_id: str
    tag: str | None
    answer: Answer | None
    error: AgentError | None
    recovered: bool = False


def settle(future: Future[Answer], answer: Answer | None, error: BaseException | None) -> None:
    """Resolve a future unless the caller cancelled it meanwhile."""
    try:
        if error is None:
            future.set_result(answer)  # type: ignore[arg-type]
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


def result_meta(env: Envelope) -> ResultMeta:
    """The typed meta of a RESULT; an ``ok`` one without a label or confidence in its meta
    takes them from its output tensor (argmax and its probability)."""
    meta = env.meta
    if meta.get("status") == "ok" and env.tensors:
        label, confidence = meta.get("label"), meta.get("confidence")
        if label is None or confidence is None:
            probs = np.asarray(next(iter(env.tensors.values())), dtype=np.float32).reshape(-1)
            if label is None and probs.size:
                label = int(np.argmax(probs))
            if confidence is None and isinstance(label, int) and 0 <= label < probs.size:
                confidence = float(probs[label])
            meta = {**meta, "label": label, "confidence": confidence}
    return ResultMeta.from_meta(meta)
