"""Poison bytes: whatever arrives, decoding raises only the package's own error."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline.compression import EnvelopeError, decode_envelope, decode_message
from fogline.compression._codec import _HEAD, ENVELOPE_VERSION, MAGIC


def _frame(body: bytes, *, kind: int = 1, codec: int = 1, flags: int = 0) -> bytes:
    """A well-framed, correctly checksummed envelope around an arbitrary (uncompressed)
    body: only the body's own parsing stands between it and the caller."""
    head = _HEAD.pack(MAGIC, ENVELOPE_VERSION, kind, codec, flags, bytes(16), 1, 2)
    frame = b"".join((head, b"\x01s", b"\x03b@1", struct.pack("<I", len(body)), body))
    return frame + struct.pack("<I", zlib.crc32(frame))


def _body(meta: bytes, tensors: bytes = b"\x00") -> bytes:
    return struct.pack("<H", len(meta)) + meta + tensors


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_meta_json_nested_very_deep_is_an_envelope_error(opening: bytes) -> None:
    meta = opening * (0xFFFF // len(opening))
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(_frame(_body(meta)))
    assert info.value.reason == "too_deep"


def test_more_tensors_than_an_envelope_may_carry_is_an_envelope_error() -> None:
    tensors = bytes([65]) + b"".join(
        bytes([2]) + f"{k:02}".encode() + bytes([5, 0, 0]) for k in range(65)
    )
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(_frame(_body(b"{}", tensors)))
    assert info.value.reason == "too_many"


def _only_envelope_errors(blob: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_envelope(blob)
    _envelopes, error = decode_message(blob)
    assert error is None or isinstance(error, EnvelopeError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_envelope_errors(blob: bytes) -> None:
    _only_envelope_errors(blob)
    _only_envelope_errors(MAGIC + bytes([ENVELOPE_VERSION]) + blob)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=256),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
)
def test_any_body_in_a_valid_frame_raises_only_envelope_errors(
    body: bytes, kind: int, codec: int, flags: int
) -> None:
    _only_envelope_errors(_frame(body, kind=kind, codec=codec, flags=flags))
    _only_envelope_errors(_frame(_body(b"{}", body), kind=kind, codec=codec))
