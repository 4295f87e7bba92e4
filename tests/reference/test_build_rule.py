"""The reference build routes every frame by the agent's own rule, NaN and infinities too.

The build's figures (shares dropped, answered at the edge, forwarded; accuracies) go into
the bundle manifest; they must say what an agent running the bundle does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fogline.edge_agent import Decision, decide_batch, decide_item
from fogline.reference import BUNDLE_DIR
from fogline.sync import Thresholds

build = pytest.importorskip("fogline.reference._build", reason="needs the tools extra")

THRESHOLDS = Thresholds(relevance=0.5, exit_confidence=0.9)
NAN, INF = math.nan, math.inf
CONFIDENT = [0.95] + [0.05 / 9] * 9
UNSURE = [0.1] * 10
BROKEN = [NAN] * 10
# relevance × exit head: every odd value against every kind of exit answer
RELEVANCE = [NAN, INF, -INF, 0.7, 0.2, 0.5, NAN, INF, -INF, NAN, INF, -INF]
EXIT_PROBS = [CONFIDENT] * 3 + [CONFIDENT, CONFIDENT, UNSURE] + [UNSURE] * 3 + [BROKEN] * 3


def _agent(relevance: list[float], exit_probs: list[list[float]]) -> list[Decision]:
    return [
        decide_item(r, np.asarray(p, dtype=np.float32), THRESHOLDS).decision
        for r, p in zip(relevance, exit_probs, strict=True)
    ]


def test_the_build_routes_nan_and_infinite_relevance_as_the_agent_decides() -> None:
    relevance = np.asarray(RELEVANCE, dtype=np.float32)
    exit_probs = np.asarray(EXIT_PROBS, dtype=np.float32)
    routes = build.routes(
        relevance,
        exit_probs,
        relevance_threshold=THRESHOLDS.relevance,
        exit_threshold=THRESHOLDS.exit_confidence,
    )
    expected = _agent(RELEVANCE, EXIT_PROBS)
    assert [Decision(int(r)) for r in routes] == expected
    # The cases this is about: a NaN relevance is never dropped, -inf always is.
    assert expected[0] == Decision.EXIT
    assert expected[6] == Decision.FORWARD
    assert expected[2] == expected[8] == expected[11] == Decision.DROP
    batch = decide_batch(
        {"rel": relevance, "exit": exit_probs},
        thresholds=THRESHOLDS,
        filter_output="rel",
        exit_output="exit",
        batch_size=len(RELEVANCE),
    )
    assert routes.tolist() == batch.decisions.tolist()


def test_the_cloud_only_baseline_filters_nan_as_the_agent_does() -> None:
    relevance = np.asarray(RELEVANCE, dtype=np.float32)
    routes = build.routes(relevance, None, relevance_threshold=0.5, exit_threshold=1.0)
    expected = [
        decide_item(r, None, Thresholds(relevance=0.5, exit_confidence=1.0)).decision
        for r in RELEVANCE
    ]
    assert [Decision(int(r)) for r in routes] == expected


def test_the_manifest_figures_count_nan_relevance_where_the_agent_sends_it() -> None:
    n = len(RELEVANCE)
    edge = build._EdgeRun(
        relevance=np.asarray(RELEVANCE, dtype=np.float32).reshape(n, 1),
        features=np.zeros((n, build.FEATURE_DIM), dtype=np.float32),
        exit_probs=np.asarray(EXIT_PROBS, dtype=np.float32),
    )
    labels = np.zeros(n, dtype=np.int64)
    figures = build._hybrid(
        edge,
        BUNDLE_DIR / "cloud.onnx",
        labels,
        exit_threshold=THRESHOLDS.exit_confidence,
        bundle_id="reference@1",
    )
    decisions = _agent(RELEVANCE, EXIT_PROBS)
    assert figures["share_dropped"] == decisions.count(Decision.DROP) / n
    assert figures["share_exited"] == decisions.count(Decision.EXIT) / n
    assert figures["share_forwarded"] == decisions.count(Decision.FORWARD) / n
    kept = [d != Decision.DROP for d in decisions]
    assert figures["relevance_accuracy"] == pytest.approx(100.0 * sum(kept) / n)
