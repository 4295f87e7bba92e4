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
import functools
import json
import math
import operator
import re
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
    "MAX_META_DEPTH",
    "MAX_META_ENTRIES",
    "MAX_META_KEY_CHARS",
    "MAX_META_STRING_CHARS",
    "MAX_TIME_US",
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
# Every stored element takes at least a byte, so no tensor of a default-size body has
# more; bounding the dims' product (zero dims counted as one) keeps an empty tensor's
# other dims from being absurd too.
_MAX_ELEMENTS = MAX_BODY_BYTES
# Times are µs since the epoch. 2^53 µs is in the year 2255: it fits int64, a datetime
# and a float64 (JSON, JavaScript) exactly, so no store or client on the way overflows.
# 0 means "not given" (the agent always sets created_us; sent_us 0 means "now" at encode).
MAX_TIME_US = 2**53 - 1
# Meta is a small flat object today; these bounds leave room for later keys while
# keeping every consumer (JSON encoders, stores, logs) far from its own limits.
MAX_META_DEPTH = 16  # the meta object itself is level 1
MAX_META_ENTRIES = 1024  # members and array items, at every level
MAX_META_KEY_CHARS = 64
MAX_META_STRING_CHARS = 4096
_MAX_META_INT = 2**63 - 1  # what SQLite and most JSON readers hold exactly
# A JSON token that opens or closes a container, or a whole string (skipped as one match:
# brackets inside strings are not structure).
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


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
        # Everything the decoder refuses is refused here too, so a bad value is caught at
        # the sender (the decoder checks first and raises EnvelopeError instead).
        if self.kind not in _KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {sorted(_KINDS)}")
        if len(self.message_id) != 16:
            raise ValueError("message_id must be 16 bytes")
        for label, text in (("site", self.site), ("bundle", self.bundle)):
            problem = _text_problem(text, label, site=label == "site")
            if problem is not None:
                raise ValueError(problem[1])
        for label, t in (("created_us", self.created_us), ("sent_us", self.sent_us)):
            if not 0 <= operator.index(t) <= MAX_TIME_US:
                raise ValueError(f"{label} {t} is outside 0..{MAX_TIME_US} (µs since the epoch)")
        if len(self.tensors) > _MAX_TENSORS:
            raise ValueError(f"at most {_MAX_TENSORS} tensors per envelope")

    @property
    def message_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.message_id)


def _text_problem(text: object, what: str, *, site: bool = False) -> tuple[str, str] | None:
    """Why ``text`` cannot be a site, bundle or tensor name (reason, detail); None if it
    can. Control and other unprintable characters are refused: these names reach logs,
    topics and metrics labels. A site is one topic level as well."""
    if type(text) is not str:
        return "bad_text", f"{what} {text!r} is not a string"
    if len(text) > 255:
        return "too_long", f"{what} is longer than 255 bytes of UTF-8"
    # Every envelope names its site and bundle, from a small set: the answer is
    # remembered rather than worked out again for each message (a bounded cache of
    # names of at most 255 characters).
    return _str_problem(text, what, site)


@functools.lru_cache(maxsize=4096)
def _str_problem(text: str, what: str, site: bool) -> tuple[str, str] | None:
    if not text:
        return "missing_field", f"{what} is empty"
    if len(text) > 255 or len(text.encode(errors="replace")) > 255:
        return "too_long", f"{what} is longer than 255 bytes of UTF-8"
    if not text.isprintable():
        return "bad_text", f"{what} {text!r} has a control or unprintable character"
    if site and ("/" in text or "+" in text or "#" in text):
        return "bad_text", f"{what} {text!r} is not one topic level (no /, + or #)"
    return None


def _encode_tensor(out: list[bytes], name: str, array: np.ndarray, codec: TensorCodec) -> None:
    arr = np.asarray(array)
    problem = _text_problem(name, "tensor name")
    if problem is not None:
        if problem[0] == "bad_text" and not isinstance(name, str):
            raise TypeError(problem[1])
        raise ValueError(problem[1])
    name_b = name.encode()
    ndim = arr.ndim
    if ndim > _MAX_NDIM:
        raise ValueError(f"tensor {name!r} has {ndim} dims, at most {_MAX_NDIM} allowed")
    if math.prod(d or 1 for d in arr.shape) > _MAX_ELEMENTS:
        raise ValueError(
            f"tensor {name!r} of shape {arr.shape} has more than {_MAX_ELEMENTS} elements"
        )
    code, params, data = codec.encode(arr, name)
    out.append(
        struct.pack(f"<B{len(name_b)}sBB{ndim}I", len(name_b), name_b, code, ndim, *arr.shape)
    )
    if params:
        out.append(params)
    out.append(data)


def encode_envelope(env: Envelope, *, zstd_level: int = 3, compress: bool = True) -> bytes:
    """Serialize an envelope; float tensors are coded with ``env.codec``.

    Raises :class:`ValueError` for anything the decoder would refuse: meta beyond its
    bounds, a tensor the codec cannot carry (NaN, ±inf, out of range), a body over
    :data:`MAX_BODY_BYTES`.
    """
    meta = dict(env.meta)
    problem = _meta_problem(meta)
    if problem is not None:
        raise ValueError(f"envelope meta: {problem[1]}")
    meta_b = _META_JSON.encode(meta).encode()
    if len(meta_b) > 0xFFFF:
        raise ValueError("envelope meta is larger than 64 KiB")
    codec = CODECS.get(env.codec)
    if codec is None:
        raise ValueError(f"envelope codec {env.codec!r} is not one of {sorted(CODECS)}")
    parts: list[bytes] = [_U16.pack(len(meta_b)), meta_b, _U8.pack(len(env.tensors))]
    for name, array in env.tensors.items():
        _encode_tensor(parts, name, array, codec)
    body = b"".join(parts)
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"envelope body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
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


def _text(data: bytes, pos: int, end: int, what: str, *, site: bool = False) -> tuple[str, int]:
    """A 1-byte-length-prefixed UTF-8 string at ``pos``; the string and the next offset."""
    if pos >= end:
        raise EnvelopeError("truncated", f"{what} runs past the end of the message")
    stop = pos + 1 + data[pos]
    if stop > end:
        raise EnvelopeError("truncated", f"{what} runs past the end of the message")
    try:
        text = data[pos + 1 : stop].decode()
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_text", f"{what} is not UTF-8") from exc
    # the length byte bounds the size: only emptiness and the characters are left
    if not text or not text.isprintable() or (site and ("/" in text or "+" in text or "#" in text)):
        problem = _text_problem(text, what, site=site)
        if problem is not None:
            raise EnvelopeError(*problem)
    return text, stop


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
    if created > MAX_TIME_US or sent > MAX_TIME_US:
        raise EnvelopeError(
            "bad_time", f"created_us {created} or sent_us {sent} is beyond {MAX_TIME_US}"
        )
    site, pos = _text(data, _HEAD.size, end, "site", site=True)
    bundle, pos = _text(data, pos, end, "bundle")
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
    meta = _decode_meta(body[_U16.size : pos])
    if pos >= end:
        raise EnvelopeError("truncated", "tensor count runs past the end of the message")
    count = body[pos]
    pos += 1
    if count > _MAX_TENSORS:
        raise EnvelopeError("too_many", f"{count} tensors, at most {_MAX_TENSORS} allowed")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        name, pos = _text(body, pos, end, "tensor name")
        if pos + 2 > end:
            raise EnvelopeError("truncated", "dtype runs past the end of the message")
        code, ndim = body[pos], body[pos + 1]
        pos += 2
        if ndim > _MAX_NDIM:
            raise EnvelopeError(
                "bad_shape", f"tensor {name!r} has {ndim} dims, at most {_MAX_NDIM} allowed"
            )
        if pos + 4 * ndim > end:
            raise EnvelopeError("truncated", "shape runs past the end of the message")
        shape = struct.unpack_from(f"<{ndim}I", body, pos)
        pos += 4 * ndim
        if math.prod(d or 1 for d in shape) > _MAX_ELEMENTS:
            raise EnvelopeError(
                "bad_shape",
                f"tensor {name!r} of shape {shape} has more than {_MAX_ELEMENTS} elements",
            )
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


def _refuse_constant(name: str) -> Any:
    raise EnvelopeError("bad_number", f"meta holds {name}: numbers must be finite")


# Python's JSON reader takes NaN and Infinity, which JSON does not have: refuse them.
_META_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _decode_meta(raw: bytes) -> dict[str, Any]:
    """The meta object of a body, within its bounds (depth, entries, string lengths,
    numbers); :class:`EnvelopeError` naming the bound otherwise."""
    # The depth is bounded before parsing: the JSON reader recurses once per level, and a
    # RecursionError (or, on a small thread stack, a crash) must not be the bound.
    # Fewer brackets than the bound cannot nest deeper: the scan is for the rare rest.
    if raw.count(b"[") + raw.count(b"{") > MAX_META_DEPTH:
        depth = 0
        for token in _JSON_TOKENS.finditer(raw):
            opened = token[0]
            if opened in (b"[", b"{"):
                depth += 1
                if depth > MAX_META_DEPTH:
                    raise EnvelopeError(
                        "too_deep", f"meta is nested more than {MAX_META_DEPTH} levels deep"
                    )
            elif opened in (b"]", b"}"):
                depth -= 1
    try:
        meta = _META_DECODER.decode(raw.decode())
    except UnicodeDecodeError as exc:
        raise EnvelopeError("bad_meta", "meta is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise EnvelopeError("bad_meta", f"meta is not JSON: {exc}") from exc
    except ValueError as exc:  # an integer longer than Python converts (4,300 digits)
        raise EnvelopeError("bad_number", f"meta holds an unreadable number: {exc}") from exc
    except RecursionError as exc:  # not reached after the scan; kept as the last guard
        raise EnvelopeError("too_deep", "meta is nested too deep") from exc
    if not isinstance(meta, dict):
        raise EnvelopeError("bad_meta", "meta is not a JSON object")
    problem = _meta_problem(meta)
    if problem is not None:
        raise EnvelopeError(*problem)
    return meta


def _meta_problem(meta: dict[str, Any]) -> tuple[str, str] | None:
    """Why ``meta`` breaks a bound (reason, detail), or None. Used on what was decoded
    and on what is about to be encoded, so the two refuse the same."""
    if len(meta) <= MAX_META_ENTRIES and _flat_meta_ok(meta):
        return None
    return _walk_meta(meta)


def _flat_meta_ok(meta: dict[str, Any]) -> bool:
    """True when ``meta`` is one level of ASCII keys and plain values, each within its
    bound: every envelope's meta, checked without :func:`_walk_meta`'s stack (it ran on
    every message, twice for a worker's reply). False means "walk it", not "refused"."""
    for key, value in meta.items():
        if type(key) is not str or len(key) > MAX_META_KEY_CHARS or not key.isascii():
            return False
        kind = type(value)
        if kind is str:
            if len(value) > MAX_META_STRING_CHARS or not value.isascii():
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is int:
            if not -_MAX_META_INT <= value <= _MAX_META_INT:
                return False
        elif kind is not bool and value is not None:
            return False
    return True


def _walk_meta(meta: dict[str, Any]) -> tuple[str, str] | None:
    """:func:`_meta_problem` for any meta: every level, every bound."""
    entries = 0
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            return "too_deep", f"meta is nested more than {MAX_META_DEPTH} levels deep"
        if isinstance(node, dict):
            entries += len(node)
            values = node.values()
            for key in node:
                if isinstance(key, str):
                    if len(key) > MAX_META_KEY_CHARS:
                        return "too_long", (
                            f"meta key {key[:32]!r}… is longer than {MAX_META_KEY_CHARS} characters"
                        )
                    if not key.isascii() and _has_surrogate(key):
                        return "bad_text", "a meta key is not valid Unicode (a lone surrogate)"
        else:
            entries += len(node)
            values = node
        if entries > MAX_META_ENTRIES:
            return "too_many", f"meta has more than {MAX_META_ENTRIES} entries"
        for value in values:
            if isinstance(value, str):
                if len(value) > MAX_META_STRING_CHARS:
                    return "too_long", (
                        f"a meta string of {len(value)} characters is longer than "
                        f"{MAX_META_STRING_CHARS}"
                    )
                if not value.isascii() and _has_surrogate(value):
                    return "bad_text", "a meta string is not valid Unicode (a lone surrogate)"
            elif isinstance(value, float):
                if not math.isfinite(value):
                    return "bad_number", f"meta holds {value!r}: numbers must be finite"
            elif isinstance(value, int):
                if not -_MAX_META_INT <= value <= _MAX_META_INT:
                    return "bad_number", f"a meta integer is beyond ±{_MAX_META_INT}"
            elif isinstance(value, (dict, list, tuple)):
                stack.append((value, depth + 1))
    return None


def _has_surrogate(text: str) -> bool:
    # JSON's \ud800 escapes make strings no UTF-8 encoder (store, log, socket) accepts
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False
