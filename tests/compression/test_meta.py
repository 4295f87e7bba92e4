"""Typed envelope metadata: every field refused when malformed, round trips exact."""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fogline.compression as compression
from fogline.compression import (
    CompressionError,
    Envelope,
    FeatureMeta,
    Kind,
    MetaError,
    ResultMeta,
    ResultStatus,
    decode_envelope,
    encode_envelope,
)
from fogline.compression._meta import MAX_ERROR_CHARS, MAX_RETRY_AFTER_MS, MAX_WORKER_CHARS

OK: dict[str, Any] = {
    "status": "ok",
    "label": 3,
    "confidence": 0.875,
    "queue_ms": 0.25,
    "compute_ms": 1.5,
    "worker": "w-1",
}


def test_the_typed_metadata_is_exported() -> None:
    names = {"FeatureMeta", "MetaError", "ResultMeta", "ResultStatus", "is_compressed"}
    assert names <= set(compression.__all__)


def test_a_bad_meta_is_an_envelope_error_of_the_package() -> None:
    with pytest.raises(MetaError) as info:
        ResultMeta.from_meta({"status": "maybe"})
    assert isinstance(info.value, CompressionError)
    assert info.value.reason == "bad_meta"
    assert info.value.field == "status"


@pytest.mark.parametrize(
    "meta",
    [
        {"status": "ok", "label": 3, "confidence": 0.5},
        OK,
        {"status": "ok", "label": 0, "confidence": 1.0, "duplicate": True, "worker": "w"},
        {"status": "busy", "retry_after_ms": 250, "worker": "w-2"},
        {"status": "busy", "retry_after_ms": 0},
        {"status": "busy"},
        {"status": "error", "error": "inference failed: boom", "worker": "w"},
    ],
)
def test_what_workers_send_today_round_trips_to_the_same_json(meta: dict[str, Any]) -> None:
    typed = ResultMeta.from_meta(meta)
    assert typed.to_meta() == meta
    assert ResultMeta.from_meta(typed.to_meta()) == typed


def test_the_wire_bytes_of_a_result_are_unchanged() -> None:
    typed = ResultMeta.ok(3, 0.875, worker="w-1", queue_ms=0.25, compute_ms=1.5)
    mid = uuid.uuid4().bytes
    old = Envelope(Kind.RESULT, mid, "s", "b@1", meta=OK, sent_us=1)
    new = Envelope(Kind.RESULT, mid, "s", "b@1", meta=typed.to_meta(), sent_us=1)
    assert encode_envelope(old) == encode_envelope(new)
    assert ResultMeta.from_meta(decode_envelope(encode_envelope(new)).meta) == typed


def test_a_result_status_is_a_string_enum() -> None:
    assert ResultMeta.from_meta({"status": "busy"}).status is ResultStatus.BUSY
    assert ResultStatus.OK == "ok"


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({}, "status"),
        ({"status": None}, "status"),
        ({"status": "OK", "label": 1, "confidence": 0.5}, "status"),
        ({"status": "maybe"}, "status"),
        ({"status": 1}, "status"),
        ({**OK, "label": None}, "label"),
        ({**OK, "label": -1}, "label"),
        ({**OK, "label": True}, "label"),
        ({**OK, "label": 1.0}, "label"),
        ({**OK, "label": "3"}, "label"),
        ({**OK, "label": 2**31}, "label"),
        ({**OK, "confidence": None}, "confidence"),
        ({**OK, "confidence": "high"}, "confidence"),
        ({**OK, "confidence": True}, "confidence"),
        ({**OK, "confidence": math.nan}, "confidence"),
        ({**OK, "confidence": math.inf}, "confidence"),
        ({**OK, "queue_ms": -0.5}, "queue_ms"),
        ({**OK, "queue_ms": "1"}, "queue_ms"),
        ({**OK, "queue_ms": math.inf}, "queue_ms"),
        ({**OK, "compute_ms": -1}, "compute_ms"),
        ({**OK, "compute_ms": False}, "compute_ms"),
        ({**OK, "worker": 7}, "worker"),
        ({**OK, "worker": "w" * (MAX_WORKER_CHARS + 1)}, "worker"),
        ({**OK, "duplicate": 1}, "duplicate"),
        ({**OK, "duplicate": "yes"}, "duplicate"),
        ({**OK, "error": "also failed"}, "error"),
        ({**OK, "retry_after_ms": 5}, "retry_after_ms"),
        ({"status": "busy", "retry_after_ms": -1}, "retry_after_ms"),
        ({"status": "busy", "retry_after_ms": 1.5}, "retry_after_ms"),
        ({"status": "busy", "retry_after_ms": True}, "retry_after_ms"),
        ({"status": "busy", "retry_after_ms": "250"}, "retry_after_ms"),
        ({"status": "busy", "retry_after_ms": MAX_RETRY_AFTER_MS + 1}, "retry_after_ms"),
        ({"status": "busy", "label": 1}, "label"),
        ({"status": "busy", "duplicate": True}, "duplicate"),
        ({"status": "error"}, "error"),
        ({"status": "error", "error": ""}, "error"),
        ({"status": "error", "error": 42}, "error"),
        ({"status": "error", "error": "e" * (MAX_ERROR_CHARS + 1)}, "error"),
        ({"status": "error", "error": "x", "confidence": 0.5}, "confidence"),
        ({"status": "error", "error": "x", "retry_after_ms": 5}, "retry_after_ms"),
    ],
)
def test_a_malformed_result_meta_is_refused_naming_the_field(
    meta: dict[str, Any], field: str
) -> None:
    with pytest.raises(MetaError) as info:
        ResultMeta.from_meta(meta)
    assert info.value.field == field


def test_constructing_a_malformed_result_meta_is_refused() -> None:
    with pytest.raises(MetaError, match="status"):
        ResultMeta("ok")  # type: ignore[arg-type]
    with pytest.raises(MetaError, match="label"):
        ResultMeta(ResultStatus.OK, confidence=0.5)
    with pytest.raises(MetaError, match="confidence"):
        ResultMeta.ok(1, math.nan)


def test_integral_numbers_are_floats_and_unknown_keys_are_ignored() -> None:
    typed = ResultMeta.from_meta({**OK, "confidence": 1, "queue_ms": 0, "later": [1]})
    assert typed.confidence == 1.0
    assert isinstance(typed.confidence, float)
    assert typed.queue_ms == 0.0
    assert "later" not in typed.to_meta()


def test_a_long_failure_message_is_cut_to_fit() -> None:
    typed = ResultMeta.failed("x" * (3 * MAX_ERROR_CHARS))
    assert typed.error is not None
    assert len(typed.error) == MAX_ERROR_CHARS
    assert ResultMeta.failed("").error == "unspecified error"


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_ms = st.floats(min_value=0, max_value=1e9, allow_nan=False)
_opt_text = st.none() | st.text(max_size=40)


@given(
    st.one_of(
        st.builds(
            ResultMeta.ok,
            st.integers(0, 2**31 - 1),
            _finite,
            worker=_opt_text,
            queue_ms=st.none() | _ms,
            compute_ms=st.none() | _ms,
            duplicate=st.booleans(),
        ),
        st.builds(
            ResultMeta.busy, st.none() | st.integers(0, MAX_RETRY_AFTER_MS), worker=_opt_text
        ),
        st.builds(ResultMeta.failed, st.text(max_size=200), worker=_opt_text),
    )
)
def test_any_result_meta_survives_the_wire(typed: ResultMeta) -> None:
    wire = json.loads(json.dumps(typed.to_meta()))
    assert ResultMeta.from_meta(wire) == typed


_json = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_keys = st.sampled_from([*sorted(OK), "error", "retry_after_ms", "duplicate"])


@given(st.dictionaries(_keys, _json | st.lists(_json, max_size=2)))
def test_any_meta_object_decodes_or_is_a_meta_error(meta: dict[str, Any]) -> None:
    with contextlib.suppress(MetaError):
        ResultMeta.from_meta(meta)


def test_feature_meta_round_trips_what_the_agent_sends() -> None:
    for meta in (
        {"decision": "forward"},
        {"decision": "forward", "relevance": 0.93},
        {"decision": "forward", "relevance": 0.93, "exit_confidence": 0.4},
    ):
        assert FeatureMeta.from_meta(meta).to_meta() == meta


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"decision": "drop"}, "decision"),
        ({"decision": 1}, "decision"),
        ({"relevance": "high"}, "relevance"),
        ({"relevance": math.nan}, "relevance"),
        ({"relevance": True}, "relevance"),
        ({"exit_confidence": math.inf}, "exit_confidence"),
        ({"exit_confidence": [0.5]}, "exit_confidence"),
    ],
)
def test_a_malformed_feature_meta_is_refused_naming_the_field(
    meta: dict[str, Any], field: str
) -> None:
    with pytest.raises(MetaError) as info:
        FeatureMeta.from_meta(meta)
    assert info.value.field == field


@given(st.none() | _finite, st.none() | _finite)
def test_any_feature_meta_survives_the_wire(rel: float | None, conf: float | None) -> None:
    typed = FeatureMeta(relevance=rel, exit_confidence=conf)
    assert FeatureMeta.from_meta(json.loads(json.dumps(typed.to_meta()))) == typed
