"""The tensor codec table: every wire codec has one codec object, and the framing rejects
what the table does not know."""

from __future__ import annotations

import struct
import uuid
import zlib

import numpy as np
import pytest

from fogline.compression import (
    Codec,
    Envelope,
    EnvelopeError,
    Kind,
    decode_envelope,
    encode_envelope,
)
from fogline.compression._tensor_codecs import CODECS, TensorType, codec_for, tensor_type


def _env(codec: Codec = Codec.INT8, **tensors: np.ndarray) -> Envelope:
    return Envelope(
        kind=Kind.FEATURES,
        message_id=uuid.uuid4().bytes,
        site="site-a",
        bundle="ref@1",
        tensors=tensors or {"x": np.linspace(-1, 1, 8, dtype=np.float32)},
        codec=codec,
    )


def _reseal(frame: bytes) -> bytes:
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_every_wire_codec_has_exactly_one_codec_object_in_the_table() -> None:
    assert set(CODECS) == set(Codec)
    for wire_id, codec in CODECS.items():
        assert codec.codec is wire_id
        assert codec_for(int(wire_id)) is codec


@pytest.mark.parametrize("wire_id", [3, 7, 0x80, 0xFF])
def test_a_codec_byte_no_codec_has_is_rejected_as_unknown_codec(wire_id: int) -> None:
    with pytest.raises(EnvelopeError) as caught:
        codec_for(wire_id)
    assert caught.value.reason == "unknown_codec"
    frame = encode_envelope(_env(), compress=False)
    with pytest.raises(EnvelopeError) as caught:
        decode_envelope(_reseal(frame[:4] + bytes([wire_id]) + frame[5:]))
    assert caught.value.reason == "unknown_codec"


def test_encoding_with_a_codec_outside_the_table_is_refused() -> None:
    env = _env(codec=9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codec"):
        encode_envelope(env)


@pytest.mark.parametrize("code", [0, 0x81, 0x8A, 11, 0x7F])
def test_a_dtype_code_no_tensor_type_has_is_a_bad_tensor(code: int) -> None:
    with pytest.raises(EnvelopeError) as caught:
        tensor_type(code, "x")
    assert caught.value.reason == "bad_tensor"


def _int8_frame_with_scale(scale: float) -> bytes:
    frame = encode_envelope(_env(x=np.array([1.0, -2.0], dtype=np.float32)), compress=False)
    # the scale is the only f32 between the shape and the data of the one tensor
    at = frame.index(struct.pack("<I", 2)) + 4
    assert struct.unpack_from("<f", frame, at)[0] == pytest.approx(2.0 / 127)
    return _reseal(frame[:at] + struct.pack("<f", scale) + frame[at + 4 :])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_an_int8_tensor_with_a_non_finite_scale_is_a_bad_tensor(scale: float) -> None:
    with pytest.raises(EnvelopeError) as caught:
        decode_envelope(_int8_frame_with_scale(scale))
    assert caught.value.reason == "bad_tensor"


def test_an_int8_tensor_cut_inside_its_scale_is_truncated() -> None:
    frame = encode_envelope(_env(x=np.array([1.0, -2.0], dtype=np.float32)), compress=False)
    at = frame.index(struct.pack("<I", 2)) + 4
    body_len_at = frame.index(b"ref@1") + 5
    cut = frame[: at + 2]
    body_len = len(cut) - body_len_at - 4
    cut = cut[:body_len_at] + struct.pack("<I", body_len) + cut[body_len_at + 4 :]
    with pytest.raises(EnvelopeError) as caught:
        decode_envelope(_reseal(cut + b"\0\0\0\0"))
    assert caught.value.reason == "truncated"
    assert "scale" in caught.value.detail


def test_integer_and_boolean_tensors_travel_exactly_under_every_codec() -> None:
    tensors = {
        "ids": np.array([[1, 2**40]], dtype=np.int64),
        "mask": np.array([True, False]),
        "u16": np.array([65535], dtype=np.uint16),
    }
    for codec in Codec:
        out = decode_envelope(encode_envelope(_env(codec, **tensors)))
        for name, array in tensors.items():
            assert out.tensors[name].dtype == array.dtype
            np.testing.assert_array_equal(out.tensors[name], array)


def test_a_dtype_the_wire_cannot_carry_is_refused_at_encode() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_envelope(_env(x=np.array([1 + 2j], dtype=np.complex64)))


def test_a_tensor_type_refuses_a_code_outside_one_byte() -> None:
    with pytest.raises(ValueError):
        TensorType(0x100, np.dtype("i1"))
    with pytest.raises(ValueError):
        TensorType(5, np.dtype("u1"), params_size=-1)
