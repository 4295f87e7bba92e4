"""Feature codec and the versioned wire envelope (see ``docs/wire-format.md``).

The format is hand-written with :mod:`struct` rather than a general serializer because
it is tiny, fixed, and on the hot path of every forwarded item; a general-purpose
format (msgpack, protobuf) would add a dependency and per-message overhead for no gain.
"""

from __future__ import annotations

import enum
import json
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from fogline.compression.errors import EnvelopeError

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_BODY_BYTES",
    "MAX_MESSAGE_BYTES",
    "Codec",
    "Envelope",
    "Kind",
    "decode_envelope",
    "decode_message",
    "encode_envelope",
    "join_envelopes",
    "mark_resent",
    "now_us",
]

MAGIC = b"FG"
ENVELOPE_VERSION = 1
MAX_BODY_BYTES = 16 * 1024 * 1024
# A message joins envelopes up to this size (one larger envelope travels alone).
MAX_MESSAGE_BYTES = 64 * 1024
_FLAG_ZSTD = 0x01
_FLAG_RESENT = 0x02
_KNOWN_FLAGS = _FLAG_ZSTD | _FLAG_RESENT
_FLAGS_AT = 5
# magic, version, kind, codec, flags, message id, created_us, sent_us
_HEAD = struct.Struct("<2sBBBB16sQQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
_CRC = struct.Struct("<I")
_MAX_NDIM = 8
_MAX_TENSORS = 64


class Kind(enum.IntEnum):
    """What an envelope carries."""

    FEATURES = 1  # edge → cloud: features to run the cloud part on
    RESULT = 2  # cloud → edge: the cloud's answer (meta ``status`` says ok/busy/error)


class Codec(enum.IntEnum):
    """How floating-point tensors are stored in the body."""

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


# dtype codes on the wire; float tensors may be re-coded by the codec
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("i1"),
    5: np.dtype("u1"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    8: np.dtype("?"),
    9: np.dtype("<i2"),
    10: np.dtype("<u2"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_INT8_QUANT = 0x80  # dtype code bit: int8 payload with scale, decodes to float32
_LOCAL = threading.local()


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Envelope:
    """One message on the wire. ``tensors`` are decoded arrays; ``meta`` is small JSON."""

    kind: Kind
    message_id: bytes
    site: str
    bundle: str
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_us: int = 0
    sent_us: int = 0
    codec: Codec = Codec.INT8
    resent: bool = False

    def __post_init__(self) -> None:
        if len(self.message_id) != 16:
            raise ValueError("message_id must be 16 bytes")
        for label, text in (("site", self.site), ("bundle", self.bundle)):
            if not text or len(text.encode()) > 255:
                raise ValueError(f"{label} must be 1..255 bytes of UTF-8")
        if len(self.tensors) > _MAX_TENSORS:
            raise ValueError(f"at most {_MAX_TENSORS} tensors per envelope")

    @property
    def message_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.message_id)


def _encode_tensor(out: list[bytes], name: str, array: np.ndarray, codec: Codec) -> None:
    arr = np.asarray(array)
    name_b = name.encode()
    if not name_b or len(name_b) > 255:
        raise ValueError(f"tensor name {name!r} must be 1..255 bytes")
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"tensor {name!r} has {arr.ndim} dims, at most {_MAX_NDIM} allowed")
    scale: float | None = None
    if arr.dtype.kind == "f" and codec is Codec.INT8:
        amax = float(np.max(np.abs(arr))) if arr.size else 0.0
        scale = amax / 127.0 if amax > 0 and np.isfinite(amax) else 1.0
        data = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
        code = _CODES[np.dtype("i1")] | _INT8_QUANT
    else:
        if arr.dtype.kind == "f" and codec is Codec.FP16:
            arr = arr.astype("<f2")
        elif arr.dtype.kind == "f" and codec is Codec.FP32:
            arr = arr.astype("<f4") if arr.dtype.itemsize < 4 else arr
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in _CODES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        data = arr.astype(dt, copy=False)
        code = _CODES[dt]
    out.append(_U8.pack(len(name_b)))
    out.append(name_b)
    out.append(_U8.pack(code))
    out.append(_U8.pack(arr.ndim))
    out.append(struct.pack(f"<{arr.ndim}I", *arr.shape))
    if scale is not None:
        out.append(_F32.pack(scale))
    out.append(np.ascontiguousarray(data).tobytes())


def encode_envelope(env: Envelope, *, zstd_level: int = 3, compress: bool = True) -> bytes:
    """Serialize an envelope; float tensors are coded with ``env.codec``."""
    meta_b = json.dumps(dict(env.meta), separators=(",", ":"), sort_keys=True).encode()
    if len(meta_b) > 0xFFFF:
        raise ValueError("envelope meta is larger than 64 KiB")
    parts: list[bytes] = [_U16.pack(len(meta_b)), meta_b, _U8.pack(len(env.tensors))]
    for name, array in env.tensors.items():
        _encode_tensor(parts, name, array, env.codec)
    body = b"".join(parts)
    flags = _FLAG_RESENT if env.resent else 0
    if compress:
        packed = _compressor(zstd_level).compress(body)
        if len(packed) < len(body):
            body, flags = packed, flags | _FLAG_ZSTD
    site_b, bundle_b = env.site.encode(), env.bundle.encode()
    head = _HEAD.pack(
        MAGIC,
        ENVELOPE_VERSION,
        int(env.kind),
        int(env.codec),
        flags,
        env.message_id,
        env.created_us,
        env.sent_us or now_us(),
    )
    frame = b"".join(
        (
            head,
            _U8.pack(len(site_b)),
            site_b,
            _U8.pack(len(bundle_b)),
            bundle_b,
            _U32.pack(len(body)),
            body,
        )
    )
    return frame + _CRC.pack(zlib.crc32(frame))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # Compressors are not thread-safe: keep one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_LOCAL, "comp", None)
    if cache is None:
        cache = _LOCAL.comp = {}
    comp = cache.get(level)
    if comp is None:
        comp = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        cache[level] = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    # A decompressor is cheap to reuse but not thread-safe: one per thread.
    dec: zstandard.ZstdDecompressor | None = getattr(_LOCAL, "dec", None)
    if dec is None:
        dec = _LOCAL.dec = zstandard.ZstdDecompressor()
    return dec


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise EnvelopeError("truncated", f"{what} runs past the end of the message")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, what))

    def text(self, what: str) -> str:
        (n,) = self.unpack(_U8, what)
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError as exc:
            raise EnvelopeError("bad_text", f"{what} is not UTF-8") from exc


def decode_envelope(data: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> Envelope:
    """Parse and validate an envelope; raises :class:`EnvelopeError` with a reason label."""
    if len(data) < _HEAD.size + _CRC.size:
        raise EnvelopeError("truncated", f"{len(data)} bytes is shorter than any envelope")
    magic, version, kind, codec, flags, mid, created, sent = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("bad_magic", "not a fogline envelope")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError("unknown_version", f"envelope version {version} is not supported")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise EnvelopeError("bad_checksum", "checksum mismatch")
    try:
        kind_e = Kind(kind)
    except ValueError:
        raise EnvelopeError("unknown_kind", f"message kind {kind} is not known") from None
    try:
        codec_e = Codec(codec)
    except ValueError:
        raise EnvelopeError("unknown_codec", f"codec {codec} is not known") from None
    if flags & ~_KNOWN_FLAGS:
        raise EnvelopeError("unknown_flags", f"flags {flags:#x} carry unknown bits")
    r = _Reader(data[: -_CRC.size])
    r.pos = _HEAD.size
    site = r.text("site")
    bundle = r.text("bundle")
    if not site or not bundle:
        raise EnvelopeError("missing_field", "site and bundle must be non-empty")
    (body_len,) = r.unpack(_U32, "body length")
    body = r.take(body_len, "body")
    if r.pos != len(r.buf):
        raise EnvelopeError("trailing_bytes", f"{len(r.buf) - r.pos} bytes after the body")
    if flags & _FLAG_ZSTD:
        try:
            body = _decompressor().decompress(body, max_output_size=max_body_bytes)
        except zstandard.ZstdError as exc:
            raise EnvelopeError("bad_compression", f"body does not decompress: {exc}") from exc
    if len(body) > max_body_bytes:
        raise EnvelopeError("too_large", f"body of {len(body)} bytes exceeds {max_body_bytes}")
    meta, tensors = _decode_body(_Reader(body))
    return Envelope(
        kind=kind_e,
        message_id=mid,
        site=site,
        bundle=bundle,
        tensors=tensors,
        meta=meta,
        created_us=created,
        sent_us=sent,
        codec=codec_e,
        resent=bool(flags & _FLAG_RESENT),
    )


def _frame_end(data: bytes, start: int) -> int:
    """Where the envelope that starts at ``start`` ends, from its length fields. Only the
    boundaries are checked here; :func:`decode_envelope` checks the frame itself."""
    size = len(data)
    if size - start < _HEAD.size + _CRC.size:
        raise EnvelopeError("truncated", f"{size - start} bytes is shorter than any envelope")
    if data[start : start + 2] != MAGIC:
        raise EnvelopeError("bad_magic", "not a fogline envelope")
    version = data[start + 2]
    if version != ENVELOPE_VERSION:
        raise EnvelopeError("unknown_version", f"envelope version {version} is not supported")
    pos = start + _HEAD.size
    pos += 1 + data[pos]  # site
    if pos >= size:
        raise EnvelopeError("truncated", "bundle runs past the end of the message")
    pos += 1 + data[pos]  # bundle
    if pos + _U32.size > size:
        raise EnvelopeError("truncated", "body length runs past the end of the message")
    body_len: int = _U32.unpack_from(data, pos)[0]
    end = pos + _U32.size + body_len + _CRC.size
    if end > size:
        raise EnvelopeError("truncated", "body runs past the end of the message")
    return end


def decode_message(
    data: bytes, *, max_body_bytes: int = MAX_BODY_BYTES
) -> tuple[list[Envelope], EnvelopeError | None]:
    """Decode a message: one or more envelopes back to back (see :func:`join_envelopes`).

    Returns the envelopes before the first one that does not decode, and that one's error
    (``None`` when all of them did). Each envelope carries its own length fields and
    checksum, so a broken one cannot be skipped: everything from it on is left out.
    """
    envelopes: list[Envelope] = []
    start, size = 0, len(data)
    try:
        while True:
            end = _frame_end(data, start)
            frame = data if start == 0 and end == size else data[start:end]
            envelopes.append(decode_envelope(frame, max_body_bytes=max_body_bytes))
            if end == size:
                return envelopes, None
            start = end
    except EnvelopeError as exc:
        return envelopes, exc


def join_envelopes(frames: Sequence[bytes], max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """Pack encoded envelopes into as few messages as fit in ``max_bytes`` each, in order.

    A sender joins what is ready at the same moment: under load one message then carries
    several items, and every per-message cost (a publish, an acknowledgement, the broker's
    routing, the receiver's wake-up) is shared among them; an envelope larger than
    ``max_bytes`` travels alone. Hand-written: the envelopes are already self-delimiting,
    so a container format would only add bytes.
    """
    messages: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for frame in frames:
        if group and size + len(frame) > max_bytes:
            messages.append(group[0] if len(group) == 1 else b"".join(group))
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    if group:
        messages.append(group[0] if len(group) == 1 else b"".join(group))
    return messages


def mark_resent(data: bytes) -> bytes:
    """The encoded envelope ``data`` with its *resent* flag set (and its checksum redone):
    the sender has sent this message before, so a receiver should look for an earlier
    answer. The rest of the frame is unchanged."""
    if len(data) < _HEAD.size + _CRC.size or data[:2] != MAGIC:
        raise ValueError("not an encoded envelope")
    frame = bytearray(data[: -_CRC.size])
    frame[_FLAGS_AT] |= _FLAG_RESENT
    return bytes(frame) + _CRC.pack(zlib.crc32(frame))


def _decode_body(r: _Reader) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (meta_len,) = r.unpack(_U16, "meta length")
    try:
        meta = json.loads(r.take(meta_len, "meta"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError("bad_meta", "meta is not JSON") from exc
    if not isinstance(meta, dict):
        raise EnvelopeError("bad_meta", "meta is not a JSON object")
    (count,) = r.unpack(_U8, "tensor count")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.text("tensor name")
        (code,) = r.unpack(_U8, "dtype")
        (ndim,) = r.unpack(_U8, "ndim")
        if ndim > _MAX_NDIM:
            raise EnvelopeError("bad_tensor", f"tensor {name!r} has {ndim} dims")
        shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim, "shape"))
        quant = bool(code & _INT8_QUANT)
        dtype = _DTYPES.get(code & ~_INT8_QUANT)
        if dtype is None or (quant and dtype != np.dtype("i1")):
            raise EnvelopeError("bad_tensor", f"tensor {name!r} has unknown dtype code {code}")
        scale = r.unpack(_F32, "scale")[0] if quant else None
        count_elems = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = r.take(count_elems * dtype.itemsize, f"tensor {name!r} data")
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        if scale is not None:
            if not np.isfinite(scale):
                raise EnvelopeError("bad_tensor", f"tensor {name!r} has a non-finite scale")
            arr = arr.astype(np.float32) * np.float32(scale)
        if name in tensors:
            raise EnvelopeError("bad_tensor", f"tensor {name!r} appears twice")
        tensors[name] = arr
    if r.pos != len(r.buf):
        raise EnvelopeError("trailing_bytes", "bytes after the last tensor")
    return meta, tensors
