"""Poison envelopes: every field at an extreme, behind a valid checksum, is refused with
its own reason, and the encoder refuses to build the same values.

The frames are built by hand (``_frame``) so that they pass the checksum and reach the
field checks; ``docs/wire-format.md`` lists the bounds and reasons.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import uuid
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline.compression import (
    Codec,
    Envelope,
    EnvelopeError,
    Kind,
    decode_envelope,
    decode_message,
    encode_envelope,
)
from fogline.compression._codec import (
    _HEAD,
    ENVELOPE_VERSION,
    MAGIC,
    MAX_META_DEPTH,
    MAX_META_ENTRIES,
    MAX_META_KEY_CHARS,
    MAX_META_STRING_CHARS,
    MAX_TIME_US,
)
from fogline.compression._tensor_codecs import _MAX_SCALE


def _text(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _tensor(
    name: bytes = b"x",
    code: int = 1,
    shape: tuple[int, ...] = (2,),
    params: bytes = b"",
    data: bytes | None = None,
) -> bytes:
    if data is None:
        count = 1
        for d in shape:
            count *= d
        data = b"\0" * (4 * count)
    head = _text(name) + bytes([code, len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
    return head + params + data


def _body(meta: bytes = b"{}", tensors: tuple[bytes, ...] = (), count: int | None = None) -> bytes:
    n = len(tensors) if count is None else count
    return struct.pack("<H", len(meta)) + meta + bytes([n]) + b"".join(tensors)


def _frame(
    body: bytes | None = None,
    *,
    kind: int = 1,
    codec: int = 0,
    flags: int = 0,
    created: int = 1_700_000_000_000_000,
    sent: int = 1_700_000_000_000_001,
    site: bytes = b"site-a",
    bundle: bytes = b"ref@1",
) -> bytes:
    """A correctly checksummed envelope with any field values, even ones no encoder
    makes: only the decoder's field checks stand between it and the caller."""
    body = _body() if body is None else body
    head = _HEAD.pack(MAGIC, ENVELOPE_VERSION, kind, codec, flags, bytes(16), created, sent)
    frame = head + _text(site) + _text(bundle) + struct.pack("<I", len(body)) + body
    return frame + struct.pack("<I", zlib.crc32(frame))


def _nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


POISON: dict[str, tuple[bytes, str]] = {
    "created_us 2^64-1": (_frame(created=2**64 - 1), "bad_time"),
    "created_us 2^53": (_frame(created=MAX_TIME_US + 1), "bad_time"),
    "sent_us 2^63": (_frame(sent=2**63), "bad_time"),
    "meta nested 30,000 deep": (_frame(_body(b"[" * 30_000)), "too_deep"),
    "meta objects nested 13,000 deep": (_frame(_body(b'{"a":' * 13_000)), "too_deep"),
    "meta one level too deep": (_frame(_body(_nested(MAX_META_DEPTH + 1))), "too_deep"),
    "meta key too long": (
        _frame(_body(json.dumps({"k" * (MAX_META_KEY_CHARS + 1): 1}).encode())),
        "too_long",
    ),
    "meta string too long": (
        _frame(_body(json.dumps({"e": "x" * (MAX_META_STRING_CHARS + 1)}).encode())),
        "too_long",
    ),
    "meta with too many entries": (
        _frame(_body(json.dumps({"a": [0] * MAX_META_ENTRIES}).encode())),
        "too_many",
    ),
    "meta NaN": (_frame(_body(b'{"a":NaN}')), "bad_number"),
    "meta -Infinity": (_frame(_body(b'{"a":[-Infinity]}')), "bad_number"),
    "meta 1e400": (_frame(_body(b'{"a":1e400}')), "bad_number"),
    "meta 5,000-digit integer": (_frame(_body(b'{"a":' + b"9" * 5000 + b"}")), "bad_number"),
    "meta integer 2^63": (_frame(_body(b'{"a":9223372036854775808}')), "bad_number"),
    "meta lone surrogate": (_frame(_body(b'{"a":"\\ud800"}')), "bad_text"),
    "meta key lone surrogate": (_frame(_body(b'{"\\udfff":1}')), "bad_text"),
    "meta UTF-16": (_frame(_body('{"a":1}'.encode("utf-16"))), "bad_meta"),
    "meta not an object": (_frame(_body(b"[1]")), "bad_meta"),
    "site with a newline": (_frame(site=b"site\na"), "bad_text"),
    "site with a topic separator": (_frame(site=b"a/b"), "bad_text"),
    "site with a wildcard": (_frame(site=b"a+"), "bad_text"),
    "site empty": (_frame(site=b""), "missing_field"),
    "bundle with NUL": (_frame(bundle=b"r\0@1"), "bad_text"),
    "bundle not UTF-8": (_frame(bundle=b"\xff@1"), "bad_text"),
    "unknown flag bits": (_frame(flags=0x84), "unknown_flags"),
    "65 tensors": (
        _frame(_body(tensors=tuple(_tensor(f"t{k}".encode()) for k in range(65)))),
        "too_many",
    ),
    "9 dims": (_frame(_body(tensors=(_tensor(shape=(1,) * 9),))), "bad_shape"),
    "shape product overflows": (
        _frame(_body(tensors=(_tensor(shape=(2**32 - 1,) * 8, data=b""),))),
        "bad_shape",
    ),
    "empty tensor with absurd dims": (
        _frame(_body(tensors=(_tensor(shape=(0, 2**32 - 1, 2**32 - 1), data=b""),))),
        "bad_shape",
    ),
    "tensor name empty": (_frame(_body(tensors=(_tensor(name=b""),))), "missing_field"),
    "tensor name with a control character": (
        _frame(_body(tensors=(_tensor(name=b"x\x1b[2J"),))),
        "bad_text",
    ),
    "float32 NaN": (
        _frame(_body(tensors=(_tensor(data=struct.pack("<2f", 1.0, float("nan"))),))),
        "bad_value",
    ),
    "float16 inf": (
        _frame(_body(tensors=(_tensor(code=2, data=bytes.fromhex("007c0000")),))),
        "bad_value",
    ),
    "int8 negative scale": (
        _frame(
            _body(tensors=(_tensor(code=0x84, params=struct.pack("<f", -1.0), data=b"\1\2"),)),
            codec=1,
        ),
        "bad_tensor",
    ),
    "int8 -128 whose scale overflows it": (
        _frame(
            _body(
                tensors=(_tensor(code=0x84, params=struct.pack("<f", _MAX_SCALE), data=b"\x80\1"),)
            ),
            codec=1,
        ),
        "bad_tensor",
    ),
    "int8 scale whose 127-fold overflows": (
        _frame(
            _body(tensors=(_tensor(code=0x84, params=struct.pack("<f", 3e38), data=b"\x7f\1"),)),
            codec=1,
        ),
        "bad_tensor",
    ),
}


@pytest.mark.parametrize(("frame", "reason"), list(POISON.values()), ids=list(POISON))
def test_a_checksummed_envelope_with_a_field_out_of_bounds_is_refused_with_its_reason(
    frame: bytes, reason: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would be a failure
        with pytest.raises(EnvelopeError) as caught:
            decode_envelope(frame)
        assert caught.value.reason == reason, caught.value
        envelopes, error = decode_message(_frame() + frame)
    assert len(envelopes) == 1
    assert error is not None
    assert error.reason == reason


def test_fields_at_their_bounds_still_decode() -> None:
    at_bounds = _body(
        json.dumps(
            {
                "k" * MAX_META_KEY_CHARS: "x" * MAX_META_STRING_CHARS,
                "deep": json.loads(_nested(MAX_META_DEPTH - 1)),
                "n": [2**63 - 1, -(2**63) + 1, 1.5e308],
                "e": 'é [ { \\" ',
            }
        ).encode(),
        (
            _tensor(code=0x84, params=struct.pack("<f", _MAX_SCALE), data=b"\x7f\x81"),
            _tensor(name=b"empty", shape=(0, 2**24)),
        ),
    )
    env = decode_envelope(_frame(at_bounds, created=MAX_TIME_US, sent=0, codec=1, site=b"s" * 255))
    assert env.created_us == MAX_TIME_US
    top = float(np.float32(127) * np.float32(_MAX_SCALE))
    assert env.tensors["x"].tolist() == [top, -top]
    assert np.isfinite(env.tensors["x"]).all()
    assert env.meta["k" * MAX_META_KEY_CHARS] == "x" * MAX_META_STRING_CHARS
    assert env.tensors["empty"].shape == (0, 2**24)


def test_the_int8_scale_bound_is_the_largest_whose_127_fold_is_finite() -> None:
    scale = np.float32(_MAX_SCALE)
    with np.errstate(over="ignore"):
        assert np.isfinite(scale * np.float32(127))
        assert not np.isfinite(np.nextafter(scale, np.float32(np.inf)) * np.float32(127))


def _env(**kw: Any) -> Envelope:
    base: dict[str, Any] = {
        "kind": Kind.FEATURES,
        "message_id": uuid.uuid4().bytes,
        "site": "site-a",
        "bundle": "ref@1",
        "tensors": {"x": np.ones((1, 4), np.float32)},
        "meta": {"decision": "forward"},
        "created_us": 1_700_000_000_000_000,
    }
    base.update(kw)
    return Envelope(**base)


def _deep_list(depth: int) -> list[Any]:
    top: list[Any] = []
    node = top
    for _ in range(depth - 1):
        node.append([])
        node = node[0]
    return top


ENCODER_REFUSES: dict[str, dict[str, Any]] = {
    "created_us 2^64-1": {"created_us": 2**64 - 1},
    "created_us negative": {"created_us": -1},
    "sent_us 2^53": {"sent_us": MAX_TIME_US + 1},
    "1 MB site": {"site": "s" * 1_000_000},
    "site of two topic levels": {"site": "a/b"},
    "site with a newline": {"site": "a\nb"},
    "empty bundle": {"bundle": ""},
    "bundle with a NUL": {"bundle": "r\0@1"},
    "kind unknown": {"kind": 9},
    "meta nested 30,000 deep": {"meta": {"a": _deep_list(30_000)}},
    "meta key too long": {"meta": {"k" * (MAX_META_KEY_CHARS + 1): 1}},
    "meta string too long": {"meta": {"e": "x" * (MAX_META_STRING_CHARS + 1)}},
    "meta with too many entries": {"meta": {"a": list(range(MAX_META_ENTRIES))}},
    "meta NaN": {"meta": {"a": float("nan")}},
    "meta numpy inf": {"meta": {"a": np.float64("inf")}},
    "meta integer 2^64": {"meta": {"a": 2**64}},
    "meta lone surrogate": {"meta": {"a": "\ud800"}},
    "9 dims": {"tensors": {"x": np.ones((1,) * 9, np.float32)}},
    "empty tensor with a dim beyond u32": {"tensors": {"x": np.zeros((0, 2**33), np.float32)}},
    "tensor name empty": {"tensors": {"": np.ones(2, np.float32)}},
    "tensor name with a control character": {"tensors": {"x\x07": np.ones(2, np.float32)}},
    "body over 16 MiB": {"tensors": {"x": np.zeros(17 * 2**20, np.uint8)}},
}


@pytest.mark.parametrize("fields", list(ENCODER_REFUSES.values()), ids=list(ENCODER_REFUSES))
def test_the_encoder_refuses_what_the_decoder_would_refuse(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        encode_envelope(_env(**fields), compress=False)
    assert not isinstance(caught.value, EnvelopeError)


_HEADER_BAD: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.integers(0, 255),
    "codec": st.integers(0, 255),
    "flags": st.sampled_from([2, 4, 0x80]) | st.integers(0, 255),
    "created": st.sampled_from([0, MAX_TIME_US, MAX_TIME_US + 1, 2**63, 2**64 - 1])
    | st.integers(0, 2**64 - 1),
    "sent": st.sampled_from([0, MAX_TIME_US + 1, 2**64 - 1]) | st.integers(0, 2**64 - 1),
}
_HEADER_GOOD: dict[str, Any] = {
    "kind": 1,
    "codec": 1,
    "flags": 0,
    "created": 1_700_000_000_000_000,
    "sent": 1_700_000_000_000_001,
    "site": b"site-a",
    "bundle": b"ref@1",
}


def _damage(draw: st.DrawFn, parts: list[str]) -> set[str]:
    """Which of ``parts`` an example damages: none, one or two of them, so that each goes
    wrong on its own now and then and the checks behind the first ones are reached."""
    return set(draw(st.lists(st.sampled_from(parts), max_size=2)))


_NAMES = st.binary(max_size=255) | st.sampled_from([b"", b"a/b", b"\n", b"\xed\xa0\x80", b"x"])
_EXTREME_JSON = st.sampled_from(
    [b"NaN", b"-Infinity", b"1e400", b"9" * 4400, b"2e-400", b'"\\ud800"', b"[" * 20_000]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=70), inner, max_size=5)
    ),
    max_leaves=40,
)


@st.composite
def _metas(draw: st.DrawFn) -> bytes:
    raw = json.dumps(draw(st.dictionaries(st.text(max_size=70), _JSON, max_size=6))).encode()
    damage = _damage(draw, ["depth", "extreme", "junk"])
    if "depth" in damage:
        depth = draw(st.sampled_from([MAX_META_DEPTH - 1, MAX_META_DEPTH, 30_000]))
        raw = b'{"d":' + b"[" * depth + b"]" * depth + b"}"
    if "extreme" in damage:  # an extreme token where a value goes
        raw = b'{"x":' + draw(_EXTREME_JSON) + b"," + raw[1:]
    if "junk" in damage:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=4)) + raw[at:]
    return raw[:0xFFFF]


_ITEMSIZE = {1: 4, 2: 2, 3: 8, 4: 1, 8: 1, 0x84: 1}


@st.composite
def _tensors(draw: st.DrawFn) -> bytes:
    damage = _damage(draw, ["code", "shape", "params", "data", "name"])
    code = draw(st.sampled_from([*_ITEMSIZE, 0, 0x85, 200])) if "code" in damage else 0x84
    shape: tuple[int, ...] = (2, 3)
    if "shape" in damage:
        dims = st.sampled_from([0, 1, 2, 2**24, 2**32 - 1]) | st.integers(0, 2**32 - 1)
        shape = tuple(draw(st.lists(dims, max_size=10)))
    params = struct.pack("<f", 0.01) if code == 0x84 else b""
    if "params" in damage:
        scales = [struct.pack("<f", v) for v in (-1.0, 0.0, 3e38, _MAX_SCALE)]
        params = draw(st.sampled_from([b"", *scales]) | st.binary(min_size=4, max_size=4))
    count = 1
    for d in shape:
        count *= d
    size = min(count * _ITEMSIZE.get(code, 1), 256)
    # random data of the right size: floats among it may be NaN or infinite
    data = draw(st.binary(min_size=size, max_size=size))
    if "data" in damage:
        data = draw(st.binary(max_size=64))
    name = draw(_NAMES) if "name" in damage else b"x"
    dims_b = struct.pack(f"<{len(shape)}I", *shape)
    return bytes(_text(name[:255]) + bytes([code, len(shape)]) + dims_b + params + data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_malformed_but_checksummed_envelopes_raise_only_envelope_errors(
    data: st.DataObject,
) -> None:
    tensors = tuple(data.draw(st.lists(_tensors(), max_size=3)))
    count = data.draw(st.none() | st.integers(0, 255)) if data.draw(st.booleans()) else None
    body = _body(data.draw(_metas()), tensors, count)
    # each example damages at most two header fields, each on its own now and then
    damaged = set(data.draw(st.lists(st.sampled_from([*_HEADER_GOOD]), max_size=2)))
    bad = {**_HEADER_BAD, "site": _NAMES, "bundle": _NAMES}
    header = {k: data.draw(bad[k]) if k in damaged else v for k, v in _HEADER_GOOD.items()}
    frame = _frame(body, **header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning escaping is a failure too
        try:
            env = decode_envelope(frame)
        except EnvelopeError:
            env = None
        envelopes, error = decode_message(frame + frame)
    assert error is None or isinstance(error, EnvelopeError)
    if env is None:
        assert envelopes == []
        return
    assert len(envelopes) == 2
    assert 0 <= env.created_us <= MAX_TIME_US
    assert 0 <= env.sent_us <= MAX_TIME_US
    for array in env.tensors.values():
        if array.dtype.kind == "f":
            assert np.isfinite(array).all()
    # what was accepted can be sent on (as fp32: an int8 envelope may carry a float64
    # tensor beyond what int8 decodes to)
    encode_envelope(dataclasses.replace(env, codec=Codec.FP32), compress=False)


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_codec_refuses_non_finite_features_without_a_numpy_warning(
    codec: Codec, bad: float
) -> None:
    for dtype in (np.float16, np.float32, np.float64):
        features = np.array([[1.0, bad, 3.0]], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="NaN or infinite"):
                encode_envelope(_env(tensors={"f": features}, codec=codec))


@pytest.mark.parametrize("value", [65_520.0, -1e6, 3e38])
def test_fp16_refuses_finite_values_that_would_become_infinity(value: float) -> None:
    features = np.array([[1.0, value]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="fp16 cannot hold"):
            encode_envelope(_env(tensors={"f": features}, codec=Codec.FP16))


def test_fp16_keeps_its_largest_value_and_lets_tiny_ones_round_to_zero() -> None:
    features = np.array([[65_504.0, -65_504.0, 1e-9]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_envelope(encode_envelope(_env(tensors={"f": features}, codec=Codec.FP16)))
    assert out.tensors["f"].tolist() == [[65_504.0, -65_504.0, 0.0]]


def test_int8_refuses_float64_values_beyond_the_float32_range() -> None:
    features = np.array([[1.0, 1e300]], dtype=np.float64)
    with pytest.raises(ValueError, match="float32 range"):
        encode_envelope(_env(tensors={"f": features}, codec=Codec.INT8))


def test_int8_at_the_top_of_the_float32_range_decodes_finite_without_a_warning() -> None:
    top = float(np.finfo(np.float32).max)
    features = np.array([[top, -top, top / 2, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_envelope(encode_envelope(_env(tensors={"f": features}))).tensors["f"]
    assert np.isfinite(out).all()
    step = top / 127
    np.testing.assert_allclose(out, features, rtol=0, atol=step * 0.51)
