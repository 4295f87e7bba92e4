"""What the agent hands out: an :class:`Answer` per input, a :class:`Delivery` per item no
caller waits for any more, and the decoding of the cloud's RESULT into them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fogline.compression import Envelope, ResultMeta
from fogline.edge_agent._pipeline import BatchDecision, Decision
from fogline.edge_agent.errors import AgentError
from fogline.sync import Thresholds

if TYPE_CHECKING:  # annotations only: keep this module free of onnxruntime
    from fogline.edge_agent._loaded import LoadedBundle
    from fogline.edge_agent._metrics import BatchHistogram

__all__ = ["Answer", "Delivery", "Source", "answer_locally", "result_meta", "settle"]

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


_LOCAL: tuple[tuple[Source, Decision], ...] = (("dropped", Decision.DROP), ("edge", Decision.EXIT))


def answer_locally(
    loaded: LoadedBundle,
    decided: BatchDecision,
    futures: Sequence[Future[Answer]],
    arrived: Sequence[float],
    tags: Sequence[str | None],
    rel: list[float] | None,
    conf: list[float] | None,
    *,
    uniform: bool,
    latency: BatchHistogram,
) -> None:
    """Answer the dropped and early-exit items of a batch. ``arrived`` is per item
    (``perf_counter``); with ``uniform`` (one batch that arrived at once) the answers share
    one latency and one histogram update."""
    now = time.perf_counter()
    th, bundle = loaded.thresholds, loaded.id
    batch_ms = (now - arrived[0]) * 1000.0
    per_item = not uniform
    labels = None if decided.labels is None else decided.labels.tolist()
    for source, code in _LOCAL:
        idx = decided.indices(code).tolist()
        if not idx:
            continue
        local = source == "edge"
        # Metrics first: a caller woken by its answer may read them at once.
        if not per_item:
            latency.observe(source, batch_ms / 1000.0, len(idx))
        for i in idx:
            ms = (now - arrived[i]) * 1000.0 if per_item else batch_ms
            c = None if conf is None else conf[i]
            answer = Answer(
                source,
                labels[i] if local and labels is not None else None,
                c if local else None,
                None if rel is None else rel[i],
                c,
                th,
                bundle,
                None,
                ms,
                tag=tags[i],
            )
            if per_item:
                latency.observe(source, ms / 1000.0)
            settle(futures[i], answer, None)
