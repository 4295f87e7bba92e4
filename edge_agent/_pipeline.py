"""The edge decision per input: drop, answer locally (early exit), or forward to the cloud.

Pure functions over the edge model's outputs, vectorized over a batch with numpy because
they sit on the hot path. ``decide_item`` states the rule for one input in plain Python;
``decide_batch`` must agree with it item by item (a test holds them together).

The rule, in order:

1. **filter** — if the bundle has a filter head and ``relevance < thresholds.relevance``:
   DROP. Nothing about the input leaves the site.
2. **early exit** — if the bundle has an exit head and its top probability is
   ``>= thresholds.exit_confidence``: EXIT, answered locally with the argmax label.
3. otherwise FORWARD the feature tensors to the cloud.

A missing head skips its step. A NaN from a head never drops or exits: the input goes to
the cloud, which is the safe side.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fogline.sync import Thresholds

__all__ = ["BatchDecision", "Decision", "ItemDecision", "decide_batch", "decide_item"]


class Decision(enum.IntEnum):
    """What happens to one input. Values are stable: they index per-kind counters."""

    DROP = 0
    EXIT = 1
    FORWARD = 2

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {Decision.DROP: "drop", Decision.EXIT: "exit", Decision.FORWARD: "forward"}


@dataclass(frozen=True)
class ItemDecision:
    """The decision for one input and the head values it rests on."""

    decision: Decision
    relevance: float | None
    exit_confidence: float | None
    label: int | None


@dataclass(frozen=True)
class BatchDecision:
    """Decisions for a batch as arrays of length N.

    ``relevance`` and ``exit_confidence`` are ``None`` when the bundle has no such head;
    ``labels`` (argmax of the exit head) likewise.
    """

    decisions: np.ndarray  # int8 codes of Decision
    relevance: np.ndarray | None  # float32 [N]
    exit_confidence: np.ndarray | None  # float32 [N]
    labels: np.ndarray | None  # int64 [N]
    thresholds: Thresholds

    def __len__(self) -> int:
        return int(self.decisions.shape[0])

    def indices(self, decision: Decision) -> np.ndarray:
        """Positions of the items with this decision."""
        return np.flatnonzero(self.decisions == decision)

    def counts(self) -> tuple[int, int, int]:
        """How many items were dropped, answered at the edge, forwarded."""
        c = np.bincount(self.decisions, minlength=3)
        return int(c[0]), int(c[1]), int(c[2])

    def item(self, i: int) -> ItemDecision:
        return ItemDecision(
            decision=Decision(int(self.decisions[i])),
            relevance=None if self.relevance is None else float(self.relevance[i]),
            exit_confidence=None
            if self.exit_confidence is None
            else float(self.exit_confidence[i]),
            label=None if self.labels is None else int(self.labels[i]),
        )


def _relevance_vector(arr: np.ndarray, n: int) -> np.ndarray:
    """A filter output of shape [N] or [N, 1] as float32 [N]."""
    out = np.asarray(arr, dtype=np.float32)
    if out.shape == (n,):
        return out
    if out.ndim == 2 and out.shape == (n, 1):
        return out[:, 0]
    raise ValueError(f"filter output has shape {list(out.shape)}, expected [{n}] or [{n}, 1]")


def _exit_matrix(arr: np.ndarray, n: int) -> np.ndarray:
    out = np.asarray(arr, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        raise ValueError(f"exit output has shape {list(out.shape)}, expected [{n}, classes]")
    return out


def decide_batch(
    outputs: Mapping[str, np.ndarray],
    *,
    thresholds: Thresholds,
    filter_output: str | None,
    exit_output: str | None,
    batch_size: int,
) -> BatchDecision:
    """Decide every item of a batch from the edge model's outputs (by name)."""
    n = batch_size
    decisions = np.full(n, Decision.FORWARD, dtype=np.int8)
    relevance = exit_conf = labels = None
    if exit_output is not None:
        probs = _exit_matrix(outputs[exit_output], n)
        labels = np.argmax(probs, axis=1)
        exit_conf = probs[np.arange(n), labels]
        # float64 thresholds: compare exactly, as decide_item does, not in float32.
        decisions[exit_conf >= np.float64(thresholds.exit_confidence)] = Decision.EXIT
    if filter_output is not None:
        relevance = _relevance_vector(outputs[filter_output], n)
        # Dropping wins over exiting: the filter runs first, so nothing else is looked at.
        decisions[relevance < np.float64(thresholds.relevance)] = Decision.DROP
    return BatchDecision(decisions, relevance, exit_conf, labels, thresholds)


def decide_item(
    relevance: float | None, exit_probs: np.ndarray | None, thresholds: Thresholds
) -> ItemDecision:
    """The same rule for a single input, written out step by step."""
    label: int | None = None
    confidence: float | None = None
    if exit_probs is not None:
        probs = np.asarray(exit_probs, dtype=np.float32).reshape(-1)
        label = int(np.argmax(probs))
        confidence = float(probs[label])
    rel = None if relevance is None else float(np.float32(relevance))
    if rel is not None and rel < thresholds.relevance:
        return ItemDecision(Decision.DROP, rel, confidence, label)
    if confidence is not None and confidence >= thresholds.exit_confidence:
        return ItemDecision(Decision.EXIT, rel, confidence, label)
    return ItemDecision(Decision.FORWARD, rel, confidence, label)
