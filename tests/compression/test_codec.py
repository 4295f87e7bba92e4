"""The feature codec and the wire envelope: round trips and rejection of bad bytes."""

from __future__ import annotations

import contextlib
import struct
import uuid
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.compression import (
    ENVELOPE_VERSION,
    Codec,
    Envelope,
    EnvelopeError,
    Kind,
    decode_envelope,
    decode_message,
    encode_envelope,
    join_envelopes,
)


def _env(**kw: object) -> Envelope:
    base: dict[str, object] = {
        "kind": Kind.FEATURES,
        "message_id": uuid.uuid4().bytes,
        "site": "site-a",
        "bundle": "reference@1",
        "tensors": {"features": np.linspace(-3, 5, 64, dtype=np.float32).reshape(1, 64)},
        "meta": {"decision": "forward", "relevance": 0.93},
        "created_us": 1_700_000_000_000_000,
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def _reseal(frame: bytes) -> bytes:
    """Recompute the trailing CRC so a test can reach checks behind it."""
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_int8_features_round_trip_within_half_a_quantization_step() -> None:
    env = _env()
    out = decode_envelope(encode_envelope(env))
    original = env.tensors["features"]
    decoded = out.tensors["features"]
    step = float(np.abs(original).max()) / 127
    assert decoded.dtype == np.float32
    assert decoded.shape == original.shape
    assert float(np.abs(decoded - original).max()) <= step / 2 + 1e-6
    assert out.message_id == env.message_id
    assert (out.site, out.bundle, out.kind, out.codec) == (
        "site-a",
        "reference@1",
        Kind.FEATURES,
        Codec.INT8,
    )
    assert out.meta == env.meta
    assert out.created_us == env.created_us
    assert out.sent_us > 0


@pytest.mark.parametrize("codec", [Codec.FP16, Codec.FP32])
def test_float_codecs_round_trip(codec: Codec) -> None:
    arr = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    out = decode_envelope(encode_envelope(_env(tensors={"x": arr}, codec=codec)))
    tol = 1e-3 if codec is Codec.FP16 else 0.0
    np.testing.assert_allclose(out.tensors["x"].astype(np.float32), arr, atol=tol, rtol=tol)


def test_integer_and_bool_tensors_travel_exactly_whatever_the_codec() -> None:
    tensors = {
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "mask": np.array([[True, False]]),
        "pixels": np.arange(256, dtype=np.uint8),
    }
    out = decode_envelope(encode_envelope(_env(tensors=tensors)))
    for name, arr in tensors.items():
        np.testing.assert_array_equal(out.tensors[name], arr)
        assert out.tensors[name].dtype == arr.dtype


def test_all_zero_features_do_not_divide_by_zero() -> None:
    out = decode_envelope(encode_envelope(_env(tensors={"f": np.zeros((1, 8), np.float32)})))
    np.testing.assert_array_equal(out.tensors["f"], np.zeros((1, 8), np.float32))


def test_a_result_envelope_with_no_tensors_round_trips() -> None:
    env = _env(kind=Kind.RESULT, tensors={}, meta={"status": "ok", "label": 3})
    out = decode_envelope(encode_envelope(env))
    assert out.kind is Kind.RESULT
    assert out.tensors == {}
    assert out.meta == {"status": "ok", "label": 3}


def test_int8_features_cost_one_byte_each_plus_a_small_fixed_overhead() -> None:
    features = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    size = len(encode_envelope(_env(tensors={"features": features})))
    assert size - features.size < 140, size


def test_unknown_version_is_rejected_with_its_reason() -> None:
    frame = bytearray(encode_envelope(_env()))
    frame[2] = ENVELOPE_VERSION + 1
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(_reseal(bytes(frame)))
    assert info.value.reason == "unknown_version"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b"XX" + b[2:], "bad_magic"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "bad_checksum"),
        (lambda b: _reseal(b[:3] + b"\x09" + b[4:]), "unknown_kind"),
        (lambda b: _reseal(b[:4] + b"\x07" + b[5:]), "unknown_codec"),
        (lambda b: _reseal(b[:5] + b"\x80" + b[6:]), "unknown_flags"),
        (lambda b: _reseal(b[:-4] + b"\x00\x00" + b"\x00" * 4), "trailing_bytes"),
    ],
)
def test_malformed_envelopes_are_rejected_with_a_named_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    frame = encode_envelope(_env())
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(mutate(frame))
    assert info.value.reason == reason


def test_decompression_bomb_is_refused() -> None:
    big = np.zeros((1, 4_000_000), np.int8)
    frame = encode_envelope(_env(tensors={"big": big}))
    assert len(frame) < 10_000
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(frame, max_body_bytes=1_000_000)
    assert info.value.reason in {"bad_compression", "too_large"}


def test_envelope_refuses_bad_fields_at_construction() -> None:
    with pytest.raises(ValueError, match="message_id"):
        _env(message_id=b"short")
    with pytest.raises(ValueError, match="site"):
        _env(site="")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_envelope(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_message_decoder(data: bytes) -> None:
    envelopes, error = decode_message(data)
    assert error is not None or envelopes


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_joined_messages_keep_the_envelopes_before_the_damage(
    data: st.DataObject,
) -> None:
    frames = [encode_envelope(_env()) for _ in range(3)]
    message = bytearray(b"".join(frames))
    pos = data.draw(st.integers(0, len(message) - 1))
    message[pos] ^= data.draw(st.integers(1, 255))
    envelopes, error = decode_message(bytes(message))
    intact = 0
    while intact < 3 and pos >= sum(len(f) for f in frames[: intact + 1]):
        intact += 1
    assert len(envelopes) == intact
    assert error is not None
    assert [e.message_id for e in envelopes] == [
        decode_envelope(f).message_id for f in frames[:intact]
    ]


@pytest.mark.parametrize("amax", [1e-40, 1e-35, 1e-20, 3e38])
def test_int8_quantization_holds_at_the_ends_of_the_float32_range(amax: float) -> None:
    arr = (np.linspace(-1.0, 1.0, 9) * amax).astype(np.float32).reshape(1, 9)
    out = decode_envelope(encode_envelope(_env(tensors={"f": arr}))).tensors["f"]
    step = float(np.abs(arr).max()) / 127.0
    np.testing.assert_allclose(out, arr, rtol=0, atol=step * 0.51 + 1e-45)
    assert np.sign(out[0, 0]) == -1
    assert np.sign(out[0, -1]) == 1


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_int8_quantization_refuses_inf_and_nan_instead_of_clipping_them(bad: float) -> None:
    arr = np.array([[bad, 2.4]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_envelope(_env(tensors={"f": arr}))


def test_joined_envelopes_decode_in_order_and_respect_the_size_bound() -> None:
    envs = [_env(meta={"n": i}) for i in range(10)]
    frames = [encode_envelope(e) for e in envs]
    size = len(frames[0])
    messages = join_envelopes(frames, max_bytes=3 * size)
    assert [len(m) for m in messages] == [3 * size, 3 * size, 3 * size, size]
    got = [env for m in messages for env in decode_message(m)[0]]
    assert [e.meta["n"] for e in got] == list(range(10))
    assert [e.message_id for e in got] == [e.message_id for e in envs]
    # one envelope larger than the bound travels alone, unchanged
    assert join_envelopes(frames[:2], max_bytes=10) == frames[:2]
    assert join_envelopes([]) == []


def test_a_message_with_a_broken_second_envelope_keeps_the_first() -> None:
    first, second = encode_envelope(_env()), encode_envelope(_env())
    envelopes, error = decode_message(first + second[:-1])
    assert [e.message_id for e in envelopes] == [decode_envelope(first).message_id]
    assert error is not None
    assert error.reason == "truncated"
    envelopes, error = decode_message(first + b"junk" * 20)
    assert len(envelopes) == 1
    assert error is not None
    assert error.reason == "bad_magic"
    envelopes, error = decode_message(b"")
    assert envelopes == []
    assert error is not None
    assert error.reason == "truncated"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_envelopes_decode_or_fail_cleanly(data: st.DataObject) -> None:
    frame = bytearray(encode_envelope(_env()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    resealed = data.draw(st.booleans())
    blob = _reseal(bytes(frame)) if resealed else bytes(frame)
    with contextlib.suppress(EnvelopeError):
        decode_envelope(blob)


def test_marking_an_envelope_resent_sets_only_that_flag_and_keeps_it_valid() -> None:
    from fogline.compression import mark_resent

    env = Envelope(Kind.FEATURES, bytes(range(16)), "site-a", "b@1", {"x": np.ones((1, 4))})
    first = encode_envelope(env)
    assert decode_envelope(first).resent is False
    again = mark_resent(first)
    assert len(again) == len(first)
    got = decode_envelope(again)
    assert got.resent is True
    assert got.message_id == env.message_id
    np.testing.assert_allclose(got.tensors["x"], decode_envelope(first).tensors["x"])
    assert mark_resent(again) == again
    assert decode_envelope(encode_envelope(got)).resent is True
    with pytest.raises(ValueError, match="not an encoded envelope"):
        mark_resent(b"nonsense")


def test_the_flag_helpers_read_what_the_encoder_set() -> None:
    from fogline.compression import is_compressed, is_resent, mark_resent

    big = _env(tensors={"x": np.zeros((1, 4096), dtype=np.float32)})
    packed = encode_envelope(big)
    plain = encode_envelope(big, compress=False)
    assert is_compressed(packed)
    assert not is_compressed(plain)
    assert not is_resent(plain)
    assert is_resent(mark_resent(plain))
    assert not is_compressed(mark_resent(plain))
    with pytest.raises(ValueError, match="not an encoded envelope"):
        is_resent(b"nope")
