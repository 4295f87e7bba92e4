"""The versioned wire envelope: framing, flags, checksum (see ``docs/wire-format.md``).

How each tensor is stored is not decided here: the framing writes a tensor's name, dtype
code and shape and looks the rest up in the tensor codec table
(:mod:`fogline.compression._tensor_codecs`).

The format is hand-written with :mod:`struct` rather than a general serializer because
it is tiny, fixed, and on the hot path of every forwarded item; a general-purpose
format (msgpack, protobuf) would add a dependency and per-message overhead for no gain.
"""

from __future__ import annotations

import enum
import json
import math
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

from fogline.compression._tensor_codecs import CODECS, Codec, TensorCodec, codec_for, tensor_type
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
    "is_compressed",
    "is_resent",
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
_CRC = struct.Struct("<I")
_MAX_NDIM = 8
_MAX_TENSORS = 64


class Kind(enum.IntEnum):
    """What an envelope carries."""

    FEATURES = 1  # edge → cloud: features to run the cloud part on
    RESULT = 2  # cloud → edge: the cloud's answer (meta ``status`` says ok/busy/error)


# One encoder for every envelope: json.dumps with options builds a new one per call.
_META_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
_KINDS = {int(k): k for k in Kind}
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


def _encode_tensor(out: list[bytes], name: str, array: np.ndarray, codec: TensorCodec) -> None:
    arr = np.asarray(array)
    name_b = name.encode()
    if not name_b or len(name_b) > 255:
        raise ValueError(f"tensor name {name!r} must be 1..255 bytes")
    ndim = arr.ndim
    if ndim > _MAX_NDIM:
        raise ValueError(f"tensor {name!r} has {ndim} dims, at most {_MAX_NDIM} allowed")
    code, params, data = codec.encode(arr, name)
    out.append(
        struct.pack(f"<B{len(name_b)}sBB{ndim}I", len(name_b), name_b, code, ndim, *arr.shape)
    )
    if params:
        out.append(params)
    out.append(data)


def encode_envelope(env: Envelope, *, zstd_level: int = 3, compress: bool = True) -> bytes:
    """Serialize an envelope; float tensors are coded with ``env.codec``."""
    meta_b = _META_JSON.encode(dict(env.meta)).encode()
    if len(meta_b) > 0xFFFF:
        raise ValueError("envelope meta is larger than 64 KiB")
    codec = CODECS.get(env.codec)
    if codec is None:
        raise ValueError(f"envelope codec {env.codec!r} is not one of {sorted(CODECS)}")
    parts: list[bytes] = [_U16.pack(len(meta_b)), meta_b, _U8.pack(len(env.tensors))]
    for name, array in env.tensors.items():
        _encode_tensor(parts, name, array, codec)
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


def _text(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """A 1-byte-length-prefixed UTF-8 string at ``pos``; the string and the next offset."""
    if pos >= end:
        raise EnvelopeError("truncated", f"{what} runs past the end of the message")
    stop = pos + 1 + data[pos]
    if stop > end:
        raise EnvelopeError("truncated", f"{what} runs past the end of the message")
    try:
        return data[pos + 1 : stop].decode(), stop
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_text", f"{what} is not UTF-8") from exc


def decode_envelope(data: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> Envelope:
    """Parse and validate an envelope; raises :class:`EnvelopeError` with a reason label."""
    size = len(data)
    if size < _HEAD.size + _CRC.size:
        raise EnvelopeError("truncated", f"{size} bytes is shorter than any envelope")
    magic, version, kind, codec, flags, mid, created, sent = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError("bad_magic", "not a fogline envelope")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError("unknown_version", f"envelope version {version} is not supported")
    end = size - _CRC.size
    if zlib.crc32(memoryview(data)[:end]) != _CRC.unpack_from(data, end)[0]:
        raise EnvelopeError("bad_checksum", "checksum mismatch")
    kind_e = _KINDS.get(kind)
    if kind_e is None:
        raise EnvelopeError("unknown_kind", f"message kind {kind} is not known")
    codec_e = codec_for(codec).codec
    if flags & ~_KNOWN_FLAGS:
        raise EnvelopeError("unknown_flags", f"flags {flags:#x} carry unknown bits")
    site, pos = _text(data, _HEAD.size, end, "site")
    bundle, pos = _text(data, pos, end, "bundle")
    if not site or not bundle:
        raise EnvelopeError("missing_field", "site and bundle must be non-empty")
    if pos + _U32.size > end:
        raise EnvelopeError("truncated", "body length runs past the end of the message")
    body_end = pos + _U32.size + _U32.unpack_from(data, pos)[0]
    if body_end > end:
        raise EnvelopeError("truncated", "body runs past the end of the message")
    if body_end != end:
        raise EnvelopeError("trailing_bytes", f"{end - body_end} bytes after the body")
    body = data[pos + _U32.size : end]
    if flags & _FLAG_ZSTD:
        try:
            body = _decompressor().decompress(body, max_output_size=max_body_bytes)
        except zstandard.ZstdError as exc:
            raise EnvelopeError("bad_compression", f"body does not decompress: {exc}") from exc
    if len(body) > max_body_bytes:
        raise EnvelopeError("too_large", f"body of {len(body)} bytes exceeds {max_body_bytes}")
    meta, tensors = _decode_body(body)
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


def _flags(data: bytes) -> int:
    if len(data) < _HEAD.size + _CRC.size or data[:2] != MAGIC:
        raise ValueError("not an encoded envelope")
    return data[_FLAGS_AT]


def is_compressed(data: bytes) -> bool:
    """Whether the encoded envelope ``data`` has a zstd-compressed body (its flags byte;
    the frame is not otherwise checked)."""
    return bool(_flags(data) & _FLAG_ZSTD)


def is_resent(data: bytes) -> bool:
    """Whether the encoded envelope ``data`` has its *resent* flag set (see
    :func:`mark_resent`; the frame is not otherwise checked)."""
    return bool(_flags(data) & _FLAG_RESENT)


def _decode_body(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    end = len(body)
    if end < _U16.size:
        raise EnvelopeError("truncated", "meta length runs past the end of the message")
    pos = _U16.size + _U16.unpack_from(body)[0]
    if pos > end:
        raise EnvelopeError("truncated", "meta runs past the end of the message")
    try:
        meta = json.loads(body[_U16.size : pos])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError("bad_meta", "meta is not JSON") from exc
    except RecursionError as exc:  # nested deeper than the interpreter's stack allows
        raise EnvelopeError("bad_meta", "meta is nested too deep") from exc
    if not isinstance(meta, dict):
        raise EnvelopeError("bad_meta", "meta is not a JSON object")
    if pos >= end:
        raise EnvelopeError("truncated", "tensor count runs past the end of the message")
    count = body[pos]
    pos += 1
    if count > _MAX_TENSORS:
        raise EnvelopeError("bad_tensor", f"{count} tensors, at most {_MAX_TENSORS} allowed")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        name, pos = _text(body, pos, end, "tensor name")
        if pos + 2 > end:
            raise EnvelopeError("truncated", "dtype runs past the end of the message")
        code, ndim = body[pos], body[pos + 1]
        pos += 2
        if ndim > _MAX_NDIM:
            raise EnvelopeError("bad_tensor", f"tensor {name!r} has {ndim} dims")
        if pos + 4 * ndim > end:
            raise EnvelopeError("truncated", "shape runs past the end of the message")
        shape = struct.unpack_from(f"<{ndim}I", body, pos)
        pos += 4 * ndim
        ttype = tensor_type(code, name)
        params = b""
        if ttype.params_size:
            stop = pos + ttype.params_size
            if stop > end:
                raise EnvelopeError(
                    "truncated", f"{ttype.params_name} runs past the end of the message"
                )
            params = body[pos:stop]
            pos = stop
        count_elems = math.prod(shape)
        stop = pos + count_elems * ttype.storage.itemsize
        if stop > end:
            raise EnvelopeError(
                "truncated", f"tensor {name!r} data runs past the end of the message"
            )
        arr = np.frombuffer(body, dtype=ttype.storage, count=count_elems, offset=pos)
        pos = stop
        arr = ttype.decode(arr.reshape(shape), params, name)
        if name in tensors:
            raise EnvelopeError("bad_tensor", f"tensor {name!r} appears twice")
        tensors[name] = arr
    if pos != end:
        raise EnvelopeError("trailing_bytes", "bytes after the last tensor")
    return meta, tensors
