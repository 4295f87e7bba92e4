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

Non-finite values never travel: every codec refuses NaN and ±inf in a float tensor at
encode (:class:`ValueError`), and each refuses a finite value it cannot represent (fp16
beyond ±65,504, int8 beyond the float32 range it decodes to) rather than let it become
inf on the way. The decoder refuses a float tensor holding one (``bad_value``), so a
receiver never computes on a value its sender did not mean.
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
class _Float(TensorType):
    """A float type stored as is: its values must be finite."""

    def decode(self, data: np.ndarray, params: bytes, name: str) -> np.ndarray:
        if not np.isfinite(data).all():
            raise EnvelopeError("bad_value", f"tensor {name!r} holds NaN or infinity")
        return data


def _largest_scale(factor: int) -> float:
    """The largest float32 scale whose ``factor``-fold is still a finite float32 (for 127
    the rounded ``max / 127`` is one step too large)."""
    scale = np.float32(float(np.finfo(np.float32).max) / factor)
    with np.errstate(over="ignore"):
        while not np.isfinite(scale * np.float32(factor)):
            scale = np.nextafter(scale, np.float32(0))
    return float(scale)


_MAX_SCALE = _largest_scale(127)
_MAX_SCALE_128 = _largest_scale(128)


@dataclass(frozen=True)
class _ScaledInt8(TensorType):
    """Int8 data times a float32 scale: decodes to float32. The scale is at most
    :data:`_MAX_SCALE` and not negative, as the encoder makes it, so every decoded value
    is finite."""

    def decode(self, data: np.ndarray, params: bytes, name: str) -> np.ndarray:
        scale: float = _F32.unpack(params)[0]
        # ``not 0 <= scale`` also catches NaN
        if not 0.0 <= scale <= _MAX_SCALE:
            raise EnvelopeError(
                "bad_tensor", f"tensor {name!r} has scale {scale!r}, outside 0..{_MAX_SCALE}"
            )
        if scale > _MAX_SCALE_128:
            # The encoder writes -127..127; a -128 times a scale this large overflows
            with np.errstate(over="ignore"):
                out = data * np.float32(scale)
            if not np.isfinite(out).all():
                raise EnvelopeError(
                    "bad_tensor", f"tensor {name!r} holds -128, which its scale {scale!r} overflows"
                )
            return out
        return data * np.float32(scale)


# The exact types: every dtype a tensor may have, as it is stored.
_PLAIN: tuple[TensorType, ...] = (
    _Float(1, np.dtype("<f4")),
    _Float(2, np.dtype("<f2")),
    _Float(3, np.dtype("<f8")),
    *(
        TensorType(code, np.dtype(name))
        for code, name in (
            (4, "i1"),
            (5, "u1"),
            (6, "<i4"),
            (7, "<i8"),
            (8, "?"),
            (9, "<i2"),
            (10, "<u2"),
        )
    ),
)
_PLAIN_CODES: dict[np.dtype[Any], int] = {t.storage: t.code for t in _PLAIN}
_Q8 = _ScaledInt8(_PLAIN_CODES[np.dtype("i1")] | 0x80, np.dtype("i1"), _F32.size, "scale")
_F32_MAX = float(np.finfo(np.float32).max)
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


def _non_finite(array: np.ndarray, name: str) -> ValueError:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    return ValueError(
        f"tensor {name!r} holds {bad} NaN or infinite value(s) of {array.size}: "
        "only finite values travel"
    )


class Fp32Codec(TensorCodec):
    """Floats as they are, widened to float32 when narrower (float64 stays float64).
    NaN and ±inf are refused."""

    codec = Codec.FP32

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        if not np.isfinite(array).all():
            raise _non_finite(array, name)
        if array.dtype.itemsize < 4:
            array = array.astype("<f4")
        return encode_exact(array, name)


_F16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(TensorCodec):
    """Floats as half precision. NaN and ±inf are refused, and so is a finite value that
    half precision cannot hold (beyond ±65,504, which would round to infinity); values
    too small for it become zero, as rounding does."""

    codec = Codec.FP16

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        # Checked before the cast, which then cannot overflow (nor make numpy warn): one
        # reduction instead of an error-state context and a scan of the result, on every
        # result a worker sends.
        amax = float(np.abs(array).max()) if array.size else 0.0
        if not amax <= _F16_MAX:  # NaN compares false
            if not math.isfinite(amax):
                raise _non_finite(array, name)
            raise ValueError(
                f"tensor {name!r} holds values beyond ±{_F16_MAX:,.0f}, which fp16 cannot "
                "hold: use the fp32 codec, or scale the features"
            )
        return encode_exact(array.astype("<f2"), name)


class Int8Codec(TensorCodec):
    """Symmetric per-tensor int8 with the float32 scale ``max|x| / 127``: decodes to float32
    within half a quantization step. NaN and ±inf are refused, and so are values beyond
    the float32 range (a float64 tensor's), which the decoded float32 could not hold."""

    codec = Codec.INT8
    tensor_types = (_Q8,)

    def encode_float(self, array: np.ndarray, name: str) -> Encoded:
        amax = float(np.abs(array).max()) if array.size else 0.0
        if not math.isfinite(amax):  # max propagates NaN
            raise _non_finite(array, name)
        if amax > _F32_MAX:
            raise ValueError(
                f"tensor {name!r} holds values beyond the float32 range (max |x| = {amax:g}), "
                "which int8 decodes to"
            )
        if amax > _TINY_AMAX:
            # near the top of the float32 range the rounded scale would make 127 × scale
            # overflow at the receiver: keep it one step lower (|x| / scale stays < 127.5)
            scale = min(amax / 127.0, _MAX_SCALE)
            # |x| / scale <= 127 by construction: rounding cannot leave the int8 range
            data = np.rint(array * np.float32(1.0 / scale)).astype(np.int8)
        elif amax > 0:  # so small that 1 / scale overflows float32
            scale = amax / 127.0
            data = np.clip(np.rint(array.astype(np.float64) / scale), -127, 127).astype(np.int8)
        else:  # all zero
            scale = 1.0
            data = np.zeros(array.shape, np.int8)
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
