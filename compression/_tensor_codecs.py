"""Tensor codecs: how one tensor is stored in an envelope body, as a table.

Two tables, both keyed by what travels on the wire:

- :data:`CODECS`, by the envelope's codec byte: the :class:`TensorCodec` that stores the
  envelope's floating-point tensors (int8, fp16, fp32). Integer and boolean tensors travel
  exactly whatever the codec.
- the tensor types, by each tensor's own dtype code: the storage dtype of its data, the
  size of its parameters (int8's scale) and how they turn the data back into an array.
  A receiver decodes by the dtype code alone, so the envelope's codec never has to be
  consulted to read a tensor.

The framing (:mod:`fogline.compression._codec`) writes and reads the name, dtype code and
shape and looks everything else up here. ``docs/wire-format.md`` says how to add a codec.
"""

from __future__ import annotations

import abc
import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from fogline.compression.errors import EnvelopeError

__all__ = [
    "CODECS",
    "Codec",
    "Encoded",
    "Fp16Codec",
    "Fp32Codec",
    "Int8Codec",
    "TensorCodec",
    "TensorType",
    "codec_for",
    "tensor_type",
]


class Codec(enum.IntEnum):
    """How floating-point tensors are stored in the body (the envelope's codec byte)."""

    FP32 = 0  # as is
    INT8 = 1  # symmetric per-tensor int8 with an fp32 scale
    FP16 = 2  # half precision

    @classmethod
    def parse(cls, name: str) -> Codec:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown feature codec {name!r}; expected one of int8, fp16, fp32"
            ) from None


_F32 = struct.Struct("<f")

Encoded = tuple[int, bytes, bytes]
"""What a codec makes of one tensor: its dtype code, its parameters and its data."""


@dataclass(frozen=True)
class TensorType:
    """One dtype code: the storage dtype of the data and the parameters that follow the
    shape. The plain types carry no parameters and decode to their storage as is."""

    code: int
    storage: np.dtype[Any]
    params_size: int = 0
    params_name: str = "parameters"

    def __post_init__(self) -> None:
        if not 1 <= self.code <= 0xFF:
            raise ValueError(f"dtype code {self.code} must be 1..255")
        if self.params_size < 0:
            raise ValueError("params_size must be >= 0")

    def decode(self, data: np.ndarray, params: bytes, name: str) -> np.ndarray:
        """The tensor from its stored ``data`` (already shaped) and ``params``; raises
        :class:`EnvelopeError` when the parameters are unusable."""
        return data


@dataclass(frozen=True)
class _ScaledInt8(TensorType):
    """Int8 data times a float32 scale: decodes to float32."""

    def decode(self, data: np.ndarray, params: bytes, name: str) -> np.ndarray:
        scale: float = _F32.unpack(params)[0]
        if not math.isfinite(scale):
            raise EnvelopeError("bad_tensor", f"tensor {name!r} has a non-finite scale")
        return data * np.float32(scale)


# The exact types: every dtype a tensor may have, as it is stored.
_PLAIN: tuple[TensorType, ...] = tuple(
    TensorType(code, np.dtype(name))
    for code, name in (
        (1, "<f4"),
        (2, "<f2"),
        (3, "<f8"),
        (4, "i1"),
        (5, "u1"),
        (6, "<i4"),
        (7, "<i8"),
        (8, "?"),
        (9, "<i2"),
        (10, "<u2"),
    )
)
_PLAIN_CODES: dict[np.dtype[Any], int] = {t.storage: t.code for t in _PLAIN}
_Q8 = _ScaledInt8(_PLAIN_CODES[np.dtype("i1")] | 0x80, np.dtype("i1"), _F32.size, "scale")
# Below this absolute maximum, 127 / amax overflows float32: quantize in float64 instead.
_TINY_AMAX = 1e-30


def encode_exact(array: np.ndarray, name: str) -> Encoded:
    """``array`` stored as it is, in little-endian byte order."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _PLAIN_CODES.get(dtype)
    if code is None:
        raise ValueError(f"tensor {name!r} has unsupported dtype {array.dtype}")
    return code, b"", np.ascontiguousarray(array, dtype=dtype).tobytes()


class TensorCodec(abc.ABC):
    """One way of storing floating-point tensors, named by the envelope's codec byte.

    Subclasses set :attr:`codec`, implement :meth:`encode_float`, and list in
    :attr:`tensor_types` any dtype code they introduce (with its decoding).
    """

    codec: ClassVar[Codec]
    tensor_types: ClassVar[tuple[TensorType, ...]] = ()

    def encode(self, array: np.ndarray, name: str) -> Encoded:
        """Dtype code, parameters and data of ``array``; non-float tensors travel exactly.
        Raises :class:`ValueError` for a dtype the wire cannot carry."""
        if array.dtype.kind == "f":
            return self.encode_float(array, name)
        return encode_exact(array, name)

    @abc.abstractmethod
    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        """Dtype code, parameters and data of a floating-point ``array``."""


class Fp32Codec(TensorCodec):
    """Floats as they are, widened to float32 when narrower (float64 stays float64)."""

    codec = Codec.FP32

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        if array.dtype.itemsize < 4:
            array = array.astype("<f4")
        return encode_exact(array, name)


class Fp16Codec(TensorCodec):
    """Floats as half precision."""

    codec = Codec.FP16

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        return encode_exact(array.astype("<f2"), name)


class Int8Codec(TensorCodec):
    """Symmetric per-tensor int8 with the float32 scale ``max|x| / 127``: decodes to float32
    within half a quantization step."""

    codec = Codec.INT8
    tensor_types = (_Q8,)

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        amax = float(np.abs(array).max()) if array.size else 0.0
        if _TINY_AMAX < amax < math.inf:
            scale = amax / 127.0
            # |x| / scale <= 127 by construction: rounding cannot leave the int8 range
            data = np.rint(array * np.float32(1.0 / scale)).astype(np.int8)
        elif 0 < amax < math.inf:  # so small that 1 / scale overflows float32
            scale = amax / 127.0
            data = np.clip(np.rint(array.astype(np.float64) / scale), -127, 127).astype(np.int8)
        else:  # all zero, or inf/nan present: clip what does not fit
            scale = 1.0
            data = np.clip(np.nan_to_num(array), -127, 127).round().astype(np.int8)
        return _Q8.code, _F32.pack(scale), data.tobytes()


CODECS: Mapping[Codec, TensorCodec] = MappingProxyType(
    {c.codec: c for c in (Fp32Codec(), Int8Codec(), Fp16Codec())}
)
"""Every codec, by the envelope's codec byte."""

_TYPES: dict[int, TensorType] = {t.code: t for t in _PLAIN}
for _codec in CODECS.values():
    for _type in _codec.tensor_types:
        if _type.code in _TYPES:
            raise RuntimeError(f"dtype code {_type.code:#x} is defined twice")
        _TYPES[_type.code] = _type
_BY_BYTE: dict[int, TensorCodec] = {int(k): v for k, v in CODECS.items()}


def codec_for(wire_id: int) -> TensorCodec:
    """The codec an envelope's codec byte names; :class:`EnvelopeError` ``unknown_codec``
    for a byte no codec has."""
    codec = _BY_BYTE.get(wire_id)
    if codec is None:
        raise EnvelopeError("unknown_codec", f"codec {wire_id} is not known")
    return codec


def tensor_type(code: int, name: str) -> TensorType:
    """The tensor type of a dtype code; :class:`EnvelopeError` ``bad_tensor`` when unknown."""
    found = _TYPES.get(code)
    if found is None:
        raise EnvelopeError("bad_tensor", f"tensor {name!r} has unknown dtype code {code}")
    return found
