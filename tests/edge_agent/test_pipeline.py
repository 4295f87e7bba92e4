"""The edge decision rule: drop, exit or forward, for one input and for a batch."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.edge_agent._pipeline import Decision, decide_batch, decide_item
from fogline.sync import Thresholds

TH = Thresholds(relevance=0.5, exit_confidence=0.9)


def _batch(relevance: list[float], probs: list[list[float]], th: Thresholds = TH):  # type: ignore[no-untyped-def]
    return decide_batch(
        {
            "relevance": np.array(relevance, dtype=np.float32).reshape(-1, 1),
            "exit_probs": np.array(probs, dtype=np.float32),
        },
        thresholds=th,
        filter_output="relevance",
        exit_output="exit_probs",
        batch_size=len(relevance),
    )


def test_an_irrelevant_input_is_dropped_even_when_the_exit_head_is_sure() -> None:
    d = _batch([0.1], [[0.99, 0.01]])
    assert d.item(0).decision is Decision.DROP


def test_a_relevant_confident_input_exits_with_the_argmax_label() -> None:
    d = _batch([0.8], [[0.02, 0.95, 0.03]])
    item = d.item(0)
    assert item.decision is Decision.EXIT
    assert item.label == 1
    assert item.exit_confidence == pytest.approx(0.95)


def test_a_relevant_unsure_input_is_forwarded() -> None:
    d = _batch([0.8], [[0.5, 0.4, 0.1]])
    assert d.item(0).decision is Decision.FORWARD


def test_thresholds_are_inclusive_for_exit_and_exclusive_for_drop() -> None:
    th = Thresholds(relevance=0.5, exit_confidence=0.75)
    d = _batch([0.5, 0.5], [[0.75, 0.25], [0.7, 0.3]], th)
    assert d.item(0).decision is Decision.EXIT  # relevance == threshold is kept
    assert d.item(1).decision is Decision.FORWARD


def test_zero_relevance_threshold_drops_nothing_and_full_exit_threshold_forwards_the_unsure() -> (
    None
):
    th = Thresholds(relevance=0.0, exit_confidence=1.0)
    d = _batch([0.0, 0.3], [[0.6, 0.4], [0.9, 0.1]], th)
    assert [d.item(i).decision for i in range(2)] == [Decision.FORWARD, Decision.FORWARD]


def test_a_bundle_without_a_filter_never_drops() -> None:
    d = decide_batch(
        {"exit_probs": np.array([[0.5, 0.5], [0.99, 0.01]], dtype=np.float32)},
        thresholds=TH,
        filter_output=None,
        exit_output="exit_probs",
        batch_size=2,
    )
    assert d.relevance is None
    assert [d.item(i).decision for i in range(2)] == [Decision.FORWARD, Decision.EXIT]
    assert d.item(0).relevance is None


def test_a_bundle_without_an_exit_head_drops_or_forwards() -> None:
    d = decide_batch(
        {"relevance": np.array([0.1, 0.9], dtype=np.float32)},  # shape [N] works too
        thresholds=TH,
        filter_output="relevance",
        exit_output=None,
        batch_size=2,
    )
    assert d.exit_confidence is None
    assert d.labels is None
    assert [d.item(i).decision for i in range(2)] == [Decision.DROP, Decision.FORWARD]
    assert d.item(1).label is None


def test_a_bundle_with_neither_head_forwards_everything() -> None:
    d = decide_batch({}, thresholds=TH, filter_output=None, exit_output=None, batch_size=3)
    assert d.counts() == (0, 0, 3)


def test_nan_from_a_head_sends_the_input_to_the_cloud() -> None:
    d = _batch([float("nan")], [[float("nan"), 0.5]])
    assert d.item(0).decision is Decision.FORWARD
    assert decide_item(float("nan"), np.array([np.nan, 0.5]), TH).decision is Decision.FORWARD


def test_heads_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="filter output has shape"):
        decide_batch(
            {"relevance": np.zeros((2, 2), dtype=np.float32)},
            thresholds=TH,
            filter_output="relevance",
            exit_output=None,
            batch_size=2,
        )
    with pytest.raises(ValueError, match="exit output has shape"):
        decide_batch(
            {"exit_probs": np.zeros((3,), dtype=np.float32)},
            thresholds=TH,
            filter_output=None,
            exit_output="exit_probs",
            batch_size=3,
        )


@pytest.mark.parametrize("seed", range(5))
def test_vectorized_decisions_agree_with_the_rule_item_by_item(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, classes = 500, 5
    relevance = rng.random(n).astype(np.float32)
    logits = rng.standard_normal((n, classes)) * rng.uniform(0.5, 6.0, (n, 1))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    # put some values exactly on the thresholds, where off-by-one comparisons show
    th = Thresholds(relevance=float(relevance[0]), exit_confidence=float(probs[1].max()))
    relevance[2] = np.nan
    d = decide_batch(
        {"relevance": relevance.reshape(-1, 1), "exit_probs": probs},
        thresholds=th,
        filter_output="relevance",
        exit_output="exit_probs",
        batch_size=n,
    )
    for i in range(n):
        want = decide_item(float(relevance[i]), probs[i], th)
        got = d.item(i)
        assert got.decision == want.decision, i
        assert got.label == want.label
        assert got.exit_confidence == pytest.approx(want.exit_confidence, nan_ok=True)
    counts = d.counts()
    assert sum(counts) == n
    assert all(c > 0 for c in counts)
    assert d.indices(Decision.FORWARD).size == counts[2]
