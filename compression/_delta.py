"""Deltas between two versions of a model file: send what changed, rebuild the rest.

An ONNX file is a protobuf ``ModelProto`` whose bulk is the ``raw_data`` of the graph's
initializers (the weights). A generic binary diff sees one long byte string; here the
file is cut where its tensors are, and each tensor of the new file is carried as

- **copy**: a tensor whose bytes the old file already holds (found by SHA-256, wherever
  it lies there: content addressing) — a byte range of the old file;
- **diff**: a tensor of the same name and size in the old file whose values moved a
  little (a fine-tune) — the byte-wise difference ``new - old (mod 256)``, which is mostly
  zeros and compresses well with zstd;
- **literal**: anything else — its bytes, zstd-compressed;

and everything between the tensors (the graph, names, shapes, small tensors) as a
zstd-compressed "rest" stream. A file that is not ONNX, or that does not parse, gets a
generic delta instead: zstd with the old file as a raw-content dictionary, a window that
spans it and long-distance matching (zstd's "patch-from"; python-zstandard reaches it at
level 13 and above, see docs/benchmarks.md).

The apply side needs no protobuf parser at all: a delta is a list of operations on byte
ranges (copy from the old file, add a difference to it, take bytes from a stream), so a
site with only the ``edge`` extra (no ``onnx``) rebuilds the file exactly, byte for byte,
as it was published. What made the cuts is the publisher's business: ``onnx`` parses both
files there, and a minimal walk of the protobuf wire format (below) finds where each
``raw_data`` lies, which onnx's parsed messages do not say.

Format (little-endian)::

    header   b"FGLD" | version u8 (1) | kind u8 | 2 bytes zero
             | base sha256 (32) | result sha256 (32) | result length u64
    kind 1   n_ops u32 | ops_z u32 | rest_len u64 | rest_z u64 | data_len u64 | data_z u64
             | zstd(ops: n_ops × (op u8, offset u64, length u64)) | zstd(rest) | zstd(data)
    kind 2   window_log u8 | zstd frame against the old file as a raw-content dictionary

:func:`apply_delta` refuses a delta for another base (:class:`DeltaBaseError`), one
whose result would exceed the caller's bound — the signed length — before it decompresses
anything (:class:`DeltaSizeError`), and a truncated, corrupt or unknown one
(:class:`DeltaFormatError`), and checks the rebuilt file against the result SHA-256 the
delta names. The caller still checks it against its own signed hashes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from fogline.compression.errors import DeltaBaseError, DeltaFormatError, DeltaSizeError

__all__ = [
    "DELTA_VERSION",
    "DeltaHeader",
    "DeltaKind",
    "apply_delta",
    "make_delta",
    "read_delta_header",
]

DELTA_VERSION = 1
_MAGIC = b"FGLD"
_HEADER = struct.Struct("<4sBBH32s32sQ")
_TENSOR_HEADER = struct.Struct("<IIQQQQ")
_OP = struct.Struct("<BQQ")
_OP_REST, _OP_COPY, _OP_DIFF, _OP_LITERAL = 0, 1, 2, 3
_MAX_OPS = 1 << 20
_MAX_WINDOW_LOG = 31
# Tensors smaller than this stay in the rest stream: an operation costs 17 bytes.
_MIN_TENSOR_BYTES = 1024
# A changed tensor is sent as a difference when at most this share of its bytes moved.
_DIFF_MAX_CHANGED = 0.5


class DeltaKind:
    """What a delta is made of (the header's kind byte)."""

    TENSOR = 1
    PATCH = 2


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta says of itself: its kind, the SHA-256 (hex) of the file it applies to
    and of the file it rebuilds, and the rebuilt file's length."""

    version: int
    kind: int
    base_sha256: str
    result_sha256: str
    result_length: int


def read_delta_header(delta: bytes) -> DeltaHeader:
    """The header of ``delta``; :class:`DeltaFormatError` when it is not a delta of a
    version and kind this code reads."""
    if len(delta) < _HEADER.size:
        raise DeltaFormatError(f"delta of {len(delta)} bytes is shorter than its header")
    magic, version, kind, zero, base, result, length = _HEADER.unpack_from(delta)
    if magic != _MAGIC:
        raise DeltaFormatError("not a fogline delta (bad magic)")
    if version != DELTA_VERSION:
        raise DeltaFormatError(f"delta version {version} is not supported (only 1)")
    if kind not in (DeltaKind.TENSOR, DeltaKind.PATCH) or zero != 0:
        raise DeltaFormatError(f"unknown delta kind {kind}")
    return DeltaHeader(version, kind, base.hex(), result.hex(), length)


# ----------------------------------------------------------------------------- making


@dataclass(frozen=True)
class _Tensor:
    name: bytes
    offset: int  # of raw_data's payload in the file
    length: int


def make_delta(old: bytes, new: bytes, *, level: int = 9) -> bytes:
    """A delta that rebuilds ``new`` from ``old``: tensor-aware when both are ONNX models,
    else a generic zstd patch. ``level`` is the zstd level of the changed tensors."""
    old, new = bytes(old), bytes(new)
    old_tensors = _onnx_tensors(old)
    new_tensors = _onnx_tensors(new)
    if old_tensors is None or new_tensors is None:
        return _patch_delta(old, new)
    return _tensor_delta(old, new, old_tensors, new_tensors, level)


def _header(kind: int, old: bytes, new: bytes) -> bytes:
    return _HEADER.pack(
        _MAGIC,
        DELTA_VERSION,
        kind,
        0,
        hashlib.sha256(old).digest(),
        hashlib.sha256(new).digest(),
        len(new),
    )


def _tensor_delta(
    old: bytes, new: bytes, old_tensors: list[_Tensor], new_tensors: list[_Tensor], level: int
) -> bytes:
    by_hash: dict[bytes, _Tensor] = {}
    by_name: dict[bytes, _Tensor] = {}
    for t in old_tensors:
        by_hash.setdefault(hashlib.sha256(old[t.offset : t.offset + t.length]).digest(), t)
        by_name.setdefault(t.name, t)
    old_u8 = np.frombuffer(old, dtype=np.uint8)
    new_u8 = np.frombuffer(new, dtype=np.uint8)
    ops: list[bytes] = []
    rest: list[bytes] = []
    data: list[bytes] = []
    position = 0
    for t in new_tensors:
        if t.offset > position:
            rest.append(new[position : t.offset])
            ops.append(_OP.pack(_OP_REST, 0, t.offset - position))
        payload = new[t.offset : t.offset + t.length]
        same = by_hash.get(hashlib.sha256(payload).digest())
        base = by_name.get(t.name)
        if same is not None:
            ops.append(_OP.pack(_OP_COPY, same.offset, t.length))
        elif base is not None and base.length == t.length:
            now = new_u8[t.offset : t.offset + t.length]
            diff = now - old_u8[base.offset : base.offset + t.length]
            if np.count_nonzero(diff) <= _DIFF_MAX_CHANGED * t.length:
                data.append(diff.tobytes())
                ops.append(_OP.pack(_OP_DIFF, base.offset, t.length))
            else:
                data.append(payload)
                ops.append(_OP.pack(_OP_LITERAL, 0, t.length))
        else:
            data.append(payload)
            ops.append(_OP.pack(_OP_LITERAL, 0, t.length))
        position = t.offset + t.length
    if position < len(new):
        rest.append(new[position:])
        ops.append(_OP.pack(_OP_REST, 0, len(new) - position))
    rest_bytes, data_bytes = b"".join(rest), b"".join(data)
    ops_z = zstandard.ZstdCompressor(level=19).compress(b"".join(ops))
    rest_z = zstandard.ZstdCompressor(level=19).compress(rest_bytes)
    data_z = zstandard.ZstdCompressor(level=level).compress(data_bytes)
    return b"".join(
        (
            _header(DeltaKind.TENSOR, old, new),
            _TENSOR_HEADER.pack(
                len(ops), len(ops_z), len(rest_bytes), len(rest_z), len(data_bytes), len(data_z)
            ),
            ops_z,
            rest_z,
            data_z,
        )
    )


def _window_log(old: bytes, new: bytes) -> int:
    return min(max(10, (len(old) + len(new)).bit_length()), _MAX_WINDOW_LOG)


def _patch_delta(old: bytes, new: bytes) -> bytes:
    # python-zstandard has no patch-from call, but a raw-content dictionary with a window
    # that spans it and long-distance matching is the same thing; below level 13 its
    # match finder does not search the dictionary far enough to find the old file.
    window_log = _window_log(old, new)
    params = zstandard.ZstdCompressionParameters.from_level(
        13, window_log=window_log, enable_ldm=True, write_content_size=True
    )
    compressor = zstandard.ZstdCompressor(dict_data=_raw_dict(old), compression_params=params)
    return b"".join(
        (_header(DeltaKind.PATCH, old, new), bytes([window_log]), compressor.compress(new))
    )


def _raw_dict(old: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


# -------------------------------------------------------- the protobuf wire format

# ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, .raw_data = 9
# (onnx/onnx.proto3). Only these are read; every other field is skipped by its wire type.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9


class _WireError(ValueError):
    pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in ``data[start:end]``;
    for a varint or fixed field the value range covers its bytes."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(data, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            after = pos + length
        else:
            raise _WireError(f"wire type {wire} (groups) is not used by ONNX")
        if number == 0 or after > end:
            raise _WireError("field runs past its message")
        yield number, wire, pos, after
        pos = after


def _wire_tensors(data: bytes) -> list[tuple[bytes, int, int]]:
    """(name, offset, length) of every top-level initializer's raw_data, in file order."""
    out: list[tuple[bytes, int, int]] = []
    for number, wire, start, end in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for g_number, g_wire, g_start, g_end in _fields(data, start, end):
            if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                continue
            name, raw = b"", None
            for t_number, t_wire, t_start, t_end in _fields(data, g_start, g_end):
                if t_wire != 2:
                    continue
                if t_number == _TENSOR_NAME:
                    name = data[t_start:t_end]
                elif t_number == _TENSOR_RAW_DATA:
                    raw = (t_start, t_end - t_start)
            if raw is not None:
                out.append((name, *raw))
    return out


def _onnx_model() -> Any:
    """An empty ``onnx.ModelProto``, or ``None`` where onnx is not installed."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.ModelProto()


def _onnx_tensors(data: bytes) -> list[_Tensor] | None:
    """The large tensors of an ONNX model, or ``None`` when ``data`` is not one.

    onnx (the ``tools`` extra, where models are published) decides whether the file is a
    model, and the wire walk must find the same initializers it does; without onnx the
    wire walk alone decides, which is safe either way: apply never depends on the cuts.
    """
    try:
        found = _wire_tensors(data)
    except _WireError:
        return None
    model: Any = _onnx_model()
    if model is not None:
        try:
            model.ParseFromString(data)
        except Exception:  # noqa: BLE001 (protobuf's DecodeError; any failure means "not ONNX")
            return None
        expected = [
            (t.name.encode(), len(t.raw_data)) for t in model.graph.initializer if t.raw_data
        ]
        if [(n, length) for n, _, length in found if length] != expected:
            return None
        if not model.graph.node and not model.graph.initializer:
            return None
    elif not found:
        return None
    return [_Tensor(n, o, length) for n, o, length in found if length >= _MIN_TENSOR_BYTES]


# ---------------------------------------------------------------------------- applying


def apply_delta(old: bytes, delta: bytes, *, max_output: int | None = None) -> bytes:
    """The file ``delta`` rebuilds from ``old``, checked against the SHA-256 it names.

    ``max_output`` (the signed length of the file) bounds what is rebuilt: a delta that
    says its result is longer is refused before anything is decompressed.
    """
    delta = bytes(delta)
    header = read_delta_header(delta)
    if hashlib.sha256(old).hexdigest() != header.base_sha256:
        raise DeltaBaseError(
            f"the delta applies to a file with sha256 {header.base_sha256[:16]}…, "
            "not to the one given"
        )
    if max_output is not None and header.result_length > max_output:
        raise DeltaSizeError(
            f"the delta rebuilds {header.result_length} bytes, more than the allowed {max_output}"
        )
    body = memoryview(delta)[_HEADER.size :]
    if header.kind == DeltaKind.TENSOR:
        out = _apply_tensor(old, body, header.result_length)
    else:
        out = _apply_patch(old, body, header.result_length)
    if len(out) != header.result_length or hashlib.sha256(out).hexdigest() != header.result_sha256:
        raise DeltaFormatError("the rebuilt file does not match the SHA-256 the delta names")
    return out


def _decompress(frame: memoryview, size: int, what: str) -> bytes:
    if size == 0 and len(frame) == 0:
        return b""
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"the delta's {what} stream is corrupt: {exc}") from None
    if len(out) != size:
        raise DeltaFormatError(f"the delta's {what} stream holds {len(out)} bytes, not {size}")
    return out


def _apply_tensor(old: bytes, body: memoryview, result_length: int) -> bytes:
    if len(body) < _TENSOR_HEADER.size:
        raise DeltaFormatError("the delta is truncated in its tensor header")
    n_ops, ops_z, rest_len, rest_z, data_len, data_z = _TENSOR_HEADER.unpack_from(body)
    if n_ops > min(_MAX_OPS, result_length) or rest_len + data_len > result_length:
        raise DeltaFormatError("the delta's tensor header does not fit its result length")
    frames = body[_TENSOR_HEADER.size :]
    if len(frames) != ops_z + rest_z + data_z:
        raise DeltaFormatError(
            f"the delta holds {len(frames)} bytes of streams, its header says "
            f"{ops_z + rest_z + data_z} (truncated or padded)"
        )
    ops = _decompress(frames[:ops_z], n_ops * _OP.size, "operations")
    rest = _decompress(frames[ops_z : ops_z + rest_z], rest_len, "rest")
    data = _decompress(frames[ops_z + rest_z :], data_len, "tensor")
    old_u8 = np.frombuffer(old, dtype=np.uint8)
    data_u8 = np.frombuffer(data, dtype=np.uint8)
    out = bytearray()
    rest_at = data_at = 0
    for op, offset, length in _OP.iter_unpack(ops):
        if length == 0 or len(out) + length > result_length:
            raise DeltaFormatError("a delta operation runs past the result length")
        if op == _OP_REST:
            if rest_at + length > rest_len:
                raise DeltaFormatError("a delta operation reads past the rest stream")
            out += rest[rest_at : rest_at + length]
            rest_at += length
        elif op in (_OP_COPY, _OP_DIFF):
            if offset + length > len(old):
                raise DeltaFormatError("a delta operation reads past the old file")
            if op == _OP_COPY:
                out += old[offset : offset + length]
                continue
            if data_at + length > data_len:
                raise DeltaFormatError("a delta operation reads past the tensor stream")
            added = old_u8[offset : offset + length] + data_u8[data_at : data_at + length]
            out += added.tobytes()
            data_at += length
        elif op == _OP_LITERAL:
            if data_at + length > data_len:
                raise DeltaFormatError("a delta operation reads past the tensor stream")
            out += data[data_at : data_at + length]
            data_at += length
        else:
            raise DeltaFormatError(f"unknown delta operation {op}")
    if len(out) != result_length or rest_at != rest_len or data_at != data_len:
        raise DeltaFormatError("the delta's operations do not cover its result exactly")
    return bytes(out)


def _apply_patch(old: bytes, body: memoryview, result_length: int) -> bytes:
    if len(body) < 1:
        raise DeltaFormatError("the delta is truncated before its window size")
    window_log = body[0]
    if not 10 <= window_log <= _MAX_WINDOW_LOG:
        raise DeltaFormatError(f"the delta's window 2^{window_log} is out of range")
    frame = body[1:]
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"the delta's patch stream is corrupt: {exc}") from None
    if params.content_size != result_length:
        raise DeltaFormatError("the delta's patch stream does not state its result length")
    try:
        decompressor = zstandard.ZstdDecompressor(
            dict_data=_raw_dict(old), max_window_size=1 << window_log
        )
        out = decompressor.decompress(frame, max_output_size=result_length)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"the delta's patch stream is corrupt: {exc}") from None
    return out
