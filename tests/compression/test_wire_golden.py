"""The wire bytes of every tensor codec, pinned: a fixed envelope encodes to exactly these
bytes and decodes to exactly these arrays.

The golden values were taken from the encoder before the tensor codecs became a table
(``_tensor_codecs.py``); a change here is a change of the wire format, which
``docs/wire-format.md`` must describe and receivers of older agents must accept.
"""

from __future__ import annotations

import numpy as np
import pytest

from fogline.compression import Codec, Envelope, Kind, decode_envelope, encode_envelope


def _golden_tensors() -> dict[str, np.ndarray]:
    # every branch of every codec: float widths, byte order, 0-d, empty, all-zero and
    # tiny values for int8, and each exact dtype. A tensor of NaN and ±inf was pinned here
    # until the codecs came to refuse them; the frames below are the earlier ones with
    # that tensor taken out, every other byte as it was.
    return {
        "f32": np.array([[-1.5, 0.0, 0.25], [3.0, -0.125, 7.5]], dtype=np.float32),
        "f16": np.array([0.5, -2.0, 1.0e-3], dtype=np.float16),
        "f64": np.array([1.0 / 3.0, -2.5], dtype=np.float64),
        "f32_big_endian": np.array([1.0, -4.0], dtype=">f4"),
        "scalar": np.array(2.75, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "zeros": np.zeros(4, dtype=np.float32),
        "tiny": np.array([1e-35, -2e-35], dtype=np.float32),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "u8": np.array([0, 200, 255], dtype=np.uint8),
        "i16": np.array([-300, 300], dtype=np.int16),
        "u16": np.array([0, 65535], dtype=np.uint16),
        "i32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
        "i64": np.array([-(2**40), 5], dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


def _golden_envelope(codec: Codec) -> Envelope:
    return Envelope(
        kind=Kind.FEATURES,
        message_id=bytes(range(16)),
        site="site-a",
        bundle="ref@1",
        tensors=_golden_tensors(),
        meta={"decision": "forward", "relevance": 0.5},
        created_us=1_700_000_000_000_000,
        sent_us=1_700_000_000_000_123,
        codec=codec,
    )


GOLDEN_FRAMES: dict[Codec, str] = {
    Codec.FP32: (
        "464701010000000102030405060708090a0b0c0d0e0f00401e18240a06007b401e18240a06000673"
        "6974652d610572656640315a01000026007b226465636973696f6e223a22666f7277617264222c22"
        "72656c6576616e6365223a302e357d0f03663332010202000000030000000000c0bf000000000000"
        "803e00004040000000be0000f040036631360101030000000000003f000000c00020833a03663634"
        "030102000000555555555555d53f00000000000004c00e6633325f6269675f656e6469616e010102"
        "0000000000803f000080c0067363616c617201000000304005656d70747901020000000003000000"
        "057a65726f73010104000000000000000000000000000000000000000474696e790101020000002e"
        "ad54052eadd48502693804010300000080007f02753805010300000000c8ff036931360901020000"
        "00d4fe2c01037531360a01020000000000ffff036933320602010000000200000000000080ffffff"
        "7f036936340701020000000000000000ffffff0500000000000000046d61736b0801030000000100"
        "01c7e295d6"
    ),
    Codec.INT8: (
        "464701010100000102030405060708090a0b0c0d0e0f00401e18240a06007b401e18240a06000673"
        "6974652d610572656640313601000026007b226465636973696f6e223a22666f7277617264222c22"
        "72656c6576616e6365223a302e357d0f0366333284020200000003000000c8e3713de7000433fe7f"
        "036631368401030000000402813c208100036636348401020000008542a13c11810e6633325f6269"
        "675f656e6469616e8401020000000402013d2081067363616c61728400c662b13c7f05656d707479"
        "840200000000030000000000803f057a65726f738401040000000000803f000000000474696e7984"
        "0102000000e25956023f8102693804010300000080007f02753805010300000000c8ff0369313609"
        "0102000000d4fe2c01037531360a01020000000000ffff0369333206020100000002000000000000"
        "80ffffff7f036936340701020000000000000000ffffff0500000000000000046d61736b08010300"
        "00000100017a273104"
    ),
    Codec.FP16: (
        "464701010200000102030405060708090a0b0c0d0e0f00401e18240a06007b401e18240a06000673"
        "6974652d610572656640312a01000026007b226465636973696f6e223a22666f7277617264222c22"
        "72656c6576616e6365223a302e357d0f036633320202020000000300000000be00000034004200b0"
        "804703663136020103000000003800c0191403663634020102000000553500c10e6633325f626967"
        "5f656e6469616e020102000000003c00c4067363616c61720200804105656d707479020200000000"
        "03000000057a65726f7302010400000000000000000000000474696e790201020000000000008002"
        "693804010300000080007f02753805010300000000c8ff03693136090102000000d4fe2c01037531"
        "360a01020000000000ffff036933320602010000000200000000000080ffffff7f03693634070102"
        "0000000000000000ffffff0500000000000000046d61736b080103000000010001c3511b6c"
    ),
}

# name -> (dtype, shape, data as hex) of each tensor after decoding
GOLDEN_DECODED: dict[Codec, dict[str, tuple[str, tuple[int, ...], str]]] = {
    Codec.FP32: {
        "f32": ("float32", (2, 3), "0000c0bf000000000000803e00004040000000be0000f040"),
        "f16": ("float32", (3,), "0000003f000000c00020833a"),
        "f64": ("float64", (2,), "555555555555d53f00000000000004c0"),
        "f32_big_endian": ("float32", (2,), "0000803f000080c0"),
        "scalar": ("float32", (), "00003040"),
        "empty": ("float32", (0, 3), ""),
        "zeros": ("float32", (4,), "00000000000000000000000000000000"),
        "tiny": ("float32", (2,), "2ead54052eadd485"),
        "i8": ("int8", (3,), "80007f"),
        "u8": ("uint8", (3,), "00c8ff"),
        "i16": ("int16", (2,), "d4fe2c01"),
        "u16": ("uint16", (2,), "0000ffff"),
        "i32": ("int32", (1, 2), "00000080ffffff7f"),
        "i64": ("int64", (2,), "0000000000ffffff0500000000000000"),
        "mask": ("bool", (3,), "010001"),
    },
    Codec.INT8: {
        "f32": ("float32", (2, 3), "f4f9bcbf00000000c8e3713e83c14040c8e3f1bd0000f040"),
        "f16": ("float32", (3,), "0402013f000000c000000000"),
        "f64": ("float32", (2,), "ad56ab3e000020c0"),
        "f32_big_endian": ("float32", (2,), "0402813f000080c0"),
        "scalar": ("float32", (), "00003040"),
        "empty": ("float32", (0, 3), ""),
        "zeros": ("float32", (4,), "00000000000000000000000000000000"),
        "tiny": ("float32", (2,), "7a0053052eadd485"),
        "i8": ("int8", (3,), "80007f"),
        "u8": ("uint8", (3,), "00c8ff"),
        "i16": ("int16", (2,), "d4fe2c01"),
        "u16": ("uint16", (2,), "0000ffff"),
        "i32": ("int32", (1, 2), "00000080ffffff7f"),
        "i64": ("int64", (2,), "0000000000ffffff0500000000000000"),
        "mask": ("bool", (3,), "010001"),
    },
    Codec.FP16: {
        "f32": ("float16", (2, 3), "00be00000034004200b08047"),
        "f16": ("float16", (3,), "003800c01914"),
        "f64": ("float16", (2,), "553500c1"),
        "f32_big_endian": ("float16", (2,), "003c00c4"),
        "scalar": ("float16", (), "8041"),
        "empty": ("float16", (0, 3), ""),
        "zeros": ("float16", (4,), "0000000000000000"),
        "tiny": ("float16", (2,), "00000080"),
        "i8": ("int8", (3,), "80007f"),
        "u8": ("uint8", (3,), "00c8ff"),
        "i16": ("int16", (2,), "d4fe2c01"),
        "u16": ("uint16", (2,), "0000ffff"),
        "i32": ("int32", (1, 2), "00000080ffffff7f"),
        "i64": ("int64", (2,), "0000000000ffffff0500000000000000"),
        "mask": ("bool", (3,), "010001"),
    },
}


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
def test_each_codec_encodes_the_golden_envelope_to_the_pinned_bytes(codec: Codec) -> None:
    frame = encode_envelope(_golden_envelope(codec), compress=False)
    assert frame.hex() == GOLDEN_FRAMES[codec]


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
def test_each_codec_decodes_the_pinned_bytes_to_the_pinned_arrays(codec: Codec) -> None:
    env = decode_envelope(bytes.fromhex(GOLDEN_FRAMES[codec]))
    assert env.codec is codec
    assert list(env.tensors) == list(GOLDEN_DECODED[codec])
    for name, (dtype, shape, data) in GOLDEN_DECODED[codec].items():
        got = env.tensors[name]
        assert (str(got.dtype), got.shape, got.tobytes().hex()) == (dtype, shape, data), name


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
def test_each_codec_compressed_body_decodes_like_the_pinned_one(codec: Codec) -> None:
    # zstd's output may change between library versions; what it carries may not
    env = decode_envelope(encode_envelope(_golden_envelope(codec)))
    want = decode_envelope(bytes.fromhex(GOLDEN_FRAMES[codec]))
    assert list(env.tensors) == list(want.tensors)
    for name, array in want.tensors.items():
        assert env.tensors[name].tobytes() == array.tobytes(), name
