"""The Open Inference Protocol (KServe V2) REST codec: bytes in, numpy arrays out, and back.

No I/O: the HTTP layer (:mod:`._oip_app`) hands over the raw request body and the
``Inference-Header-Content-Length`` header, and gets back either arrays checked against
the model's :class:`~fogline.cloud_service._serving.ModelMetadata` or an
:class:`~fogline.cloud_service.errors.InferenceInputError` whose message is what the client
reads in ``{"error": "…"}``.

Both body forms of the protocol are handled:

* JSON only: every input carries ``data``, flat or nested in row-major order, as JSON
  numbers, booleans (``BOOL``) or strings (``BYTES``).
* The binary tensor data extension: the body is a JSON header of
  ``Inference-Header-Content-Length`` bytes followed by the raw tensors, in the order of
  the inputs that declare ``parameters.binary_data_size``. Tensors are little-endian,
  row-major, without padding; ``BOOL`` is one byte (0 or 1) per element; ``BYTES`` is each
  element as a 4-byte little-endian length followed by its bytes. Responses use the same
  layout for every output asked for with ``parameters.binary_data`` (or, for outputs
  that do not say, the request-level ``parameters.binary_data_output``).

``BYTES`` tensors are numpy ``object`` arrays of :class:`bytes`, the convention of the
official clients (``tritonclient``); on the way out ``str`` elements and ``numpy`` string
arrays are accepted too and sent as UTF-8.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fogline.cloud_service._serving import DATATYPES, ModelMetadata, TensorSpec
from fogline.cloud_service.errors import BackendError, InferenceInputError

__all__ = [
    "BINARY_HEADER",
    "DATATYPES",
    "EncodedResponse",
    "InferenceRequest",
    "RequestedOutput",
    "datatype_of",
    "deserialize_bytes_tensor",
    "encode_inference_response",
    "model_metadata_json",
    "parse_header_length",
    "parse_inference_request",
    "serialize_bytes_tensor",
    "server_metadata_json",
]

BINARY_HEADER = "Inference-Header-Content-Length"

#: Every datatype of the protocol and the numpy dtype that holds it (little-endian on the
#: wire). ``BYTES`` lives in ``object`` arrays of :class:`bytes`.

_LITTLE_ENDIAN = sys.byteorder == "little"
_LENGTH_PREFIX = struct.Struct("<I")
# Parameters the protocol (or Triton's clients) define for a whole request; everything
# else in ``parameters`` is kept as given for the model's provider to read.
_TIMEOUT_MS_PARAM = "timeout_ms"
_TRITON_TIMEOUT_US_PARAM = "timeout"
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size")


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a request's ``outputs``: which output, and whether it goes back as
    binary data (``parameters.binary_data``, else the request's ``binary_data_output``)."""

    name: str
    binary: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceRequest:
    """A parsed, validated inference request.

    ``inputs`` are arrays of each input's declared datatype and shape. ``outputs`` is
    ``None`` when the client asked for every output; ``binary_output`` is the request-level
    ``binary_data_output`` that decides the form of those. ``timeout_ms`` comes from
    ``parameters.timeout_ms`` (milliseconds) or Triton's ``parameters.timeout``
    (microseconds), the smaller if both are given. ``parameters`` is the request's
    ``parameters`` object as sent.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool = False
    timeout_ms: float | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedResponse:
    """An encoded inference response: ``body``, and the length of its JSON header when
    binary tensors follow it (the ``Inference-Header-Content-Length`` header), else
    ``None`` (the body is plain JSON)."""

    body: bytes
    header_length: int | None

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


# -- metadata -------------------------------------------------------------------------


def server_metadata_json(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The body of ``GET /v2``."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def _tensor_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata_json(metadata: ModelMetadata) -> dict[str, Any]:
    """The body of ``GET /v2/models/{model}[/versions/{version}]``."""
    versions = list(metadata.versions) if metadata.versions else [metadata.version]
    return {
        "name": metadata.name,
        "versions": versions,
        "platform": metadata.platform,
        "inputs": [_tensor_json(t) for t in metadata.inputs],
        "outputs": [_tensor_json(t) for t in metadata.outputs],
    }


# -- BYTES elements ---------------------------------------------------------------------


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """A ``BYTES`` tensor in the binary form: each element (row-major) as a 4-byte
    little-endian length and its bytes. ``str`` elements are sent as UTF-8."""
    parts: list[bytes] = []
    for element in array.ravel(order="C").tolist():
        raw = _element_bytes(element)
        parts.append(_LENGTH_PREFIX.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """The ``count`` elements of a binary ``BYTES`` tensor as a flat ``object`` array of
    :class:`bytes`; the buffer must hold exactly that many, with nothing left over."""
    view = memoryview(buffer)
    if count * _LENGTH_PREFIX.size > len(view):
        # Checked before allocating: a shape of 10**9 must not cost 8 GB of pointers.
        raise InferenceInputError(
            f"{what}: {len(view)} bytes of binary BYTES data cannot hold the {count} "
            f"elements the shape needs"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InferenceInputError(
                f"{what}: binary BYTES data holds {i} elements, the shape needs {count}"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InferenceInputError(
                f"{what}: BYTES element {i} declares {length} bytes, only "
                f"{len(view) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InferenceInputError(
            f"{what}: binary BYTES data has {len(view) - offset} bytes after the "
            f"{count} elements its shape needs"
        )
    return out


def _element_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    raise BackendError(f"a BYTES output holds a {type(element).__name__}, not bytes or str")


# -- requests ---------------------------------------------------------------------------


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int within the body, or
    ``None`` when absent (the whole body is JSON)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise InferenceInputError(f"{BINARY_HEADER} must be a non-negative integer, got {value!r}")
    length = int(text)
    if length > body_length:
        raise InferenceInputError(
            f"{BINARY_HEADER} is {length} but the body holds only {body_length} bytes"
        )
    return length


def parse_inference_request(
    body: bytes, metadata: ModelMetadata, *, header_length: int | None = None
) -> InferenceRequest:
    """Parse and validate one inference request body against the model's metadata.

    ``header_length`` is the parsed ``Inference-Header-Content-Length`` (see
    :func:`parse_header_length`); without it the whole body must be JSON. Raises
    :class:`InferenceInputError` naming the first problem found.
    """
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head) :]
    document = _load_json(head)
    if not isinstance(document, dict):
        raise InferenceInputError("the request body must be a JSON object")

    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferenceInputError(f"'id' must be a string, got {_json_kind(request_id)}")

    parameters = _parameters(document.get("parameters"), "the request")
    binary_output = _bool_param(parameters, "binary_data_output", "the request")
    timeout_ms = _timeout_ms(parameters)

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InferenceInputError("'inputs' must be a list of input tensors")
    specs = {spec.name: spec for spec in metadata.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, raw in enumerate(raw_inputs):
        name, array, used = _parse_input(raw, position, specs, binary[offset:])
        if name in inputs:
            raise InferenceInputError(f"input {name!r} is given more than once")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InferenceInputError(
            f"the body has {len(binary) - offset} bytes of binary data after the JSON "
            f"header that no input claims with 'binary_data_size'"
        )
    missing = [name for name in specs if name not in inputs]
    if missing:
        raise InferenceInputError(
            f"model {metadata.name!r} needs input(s) {', '.join(map(repr, missing))}"
        )
    _check_batch(inputs, metadata)

    outputs = _parse_outputs(document.get("outputs"), metadata, binary_output)
    return InferenceRequest(
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        binary_output=binary_output,
        timeout_ms=timeout_ms,
        parameters=parameters,
    )


def _load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InferenceInputError("the request JSON is nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError and over-long integer literals alike.
        raise InferenceInputError(f"the request body is not valid JSON: {exc}") from None


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InferenceInputError(f"'parameters' of {where} must be an object")
    return value


def _bool_param(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InferenceInputError(
            f"parameter {key!r} of {where} must be true or false, got {_json_kind(value)}"
        )
    return value


def _timeout_ms(parameters: Mapping[str, Any]) -> float | None:
    found: list[float] = []
    ms = parameters.get(_TIMEOUT_MS_PARAM)
    if ms is not None:
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 < ms < math.inf:
            raise InferenceInputError(
                f"parameter 'timeout_ms' must be a positive number of milliseconds, got {ms!r}"
            )
        found.append(float(ms))
    us = parameters.get(_TRITON_TIMEOUT_US_PARAM)
    if us is not None:
        if isinstance(us, bool) or not isinstance(us, int) or us < 0:
            raise InferenceInputError(
                f"parameter 'timeout' must be a non-negative integer of microseconds, got {us!r}"
            )
        # Triton reads 0 as "no timeout".
        if us > 0:
            found.append(us / 1000.0)
    return min(found) if found else None


def _parse_shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InferenceInputError(f"{what}: 'shape' must be a list of integers")
    if any(d < 0 for d in value):
        raise InferenceInputError(f"{what}: shape {value} has a negative dimension")
    return tuple(value)


def _parse_input(
    raw: object, position: int, specs: Mapping[str, TensorSpec], binary: memoryview
) -> tuple[str, np.ndarray, int]:
    """One entry of ``inputs``: its name, its array, and how many binary bytes it used."""
    if not isinstance(raw, dict):
        raise InferenceInputError(f"inputs[{position}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str):
        raise InferenceInputError(f"inputs[{position}] needs a string 'name'")
    what = f"input {name!r}"
    spec = specs.get(name)
    if spec is None:
        expected = ", ".join(map(repr, specs)) or "none"
        raise InferenceInputError(f"unexpected {what}; the model's inputs are {expected}")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InferenceInputError(f"{what} needs a string 'datatype'")
    if datatype not in DATATYPES:
        raise InferenceInputError(f"{what}: unsupported datatype {datatype!r}")
    if datatype != spec.datatype:
        raise InferenceInputError(
            f"{what}: datatype {datatype} does not match the model's {spec.datatype}"
        )
    shape = _parse_shape(raw.get("shape"), what)
    _check_shape(shape, spec, what)
    count = math.prod(shape)

    params = _parameters(raw.get("parameters"), what)
    for key in _SHARED_MEMORY_PARAMS:
        if key in params:
            raise InferenceInputError(f"{what}: shared-memory tensors are not supported")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InferenceInputError(
                f"{what}: 'binary_data_size' must be a non-negative integer, got {size!r}"
            )
        if "data" in raw:
            raise InferenceInputError(f"{what} has both 'data' and 'binary_data_size'")
        if size > len(binary):
            raise InferenceInputError(
                f"{what}: 'binary_data_size' is {size} but only {len(binary)} bytes of "
                f"binary data remain in the body"
            )
        array = _from_binary(binary[:size], datatype, shape, count, what)
        return name, array, size
    if "data" not in raw:
        raise InferenceInputError(f"{what} needs 'data' or parameters.binary_data_size")
    return name, _from_json(raw["data"], datatype, shape, count, what), 0


def _check_shape(shape: tuple[int, ...], spec: TensorSpec, what: str) -> None:
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        declared = [("-1" if d < 0 else str(d)) for d in spec.shape]
        raise InferenceInputError(
            f"{what}: shape {list(shape)} does not match the model's [{', '.join(declared)}]"
        )


def _check_batch(inputs: Mapping[str, np.ndarray], metadata: ModelMetadata) -> None:
    if metadata.max_batch_size <= 0 or not inputs:
        return
    sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in inputs.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{n!r}: {b}" for n, b in sizes.items())
        raise InferenceInputError(f"inputs disagree on the batch size ({listed})")
    (batch,) = distinct
    if not 1 <= batch <= metadata.max_batch_size:
        raise InferenceInputError(
            f"batch size {batch} is outside 1..{metadata.max_batch_size}, the model's range"
        )


def _from_binary(
    raw: memoryview, datatype: str, shape: tuple[int, ...], count: int, what: str
) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count, what).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InferenceInputError(
            f"{what}: binary_data_size is {len(raw)} bytes, shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if as_bytes.size and int(as_bytes.max()) > 1:
            raise InferenceInputError(f"{what}: BOOL elements must be bytes 0 or 1")
        return as_bytes.view(np.bool_).reshape(shape)
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    if not _LITTLE_ENDIAN:
        array = array.astype(dtype)
    return array.reshape(shape)


def _flatten(data: object) -> list[Any]:
    """Row-major elements of ``data``, nested lists or a single list. Iterative, so a
    deeply nested body cannot exhaust the stack."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _first_bad(flat: Sequence[Any], ok: type | tuple[type, ...]) -> int | None:
    for i, x in enumerate(flat):
        # ``type(x) in`` rather than isinstance: JSON true must not pass for the number 1.
        if type(x) not in (ok if isinstance(ok, tuple) else (ok,)):
            return i
    return None


def _from_json(
    data: object, datatype: str, shape: tuple[int, ...], count: int, what: str
) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise InferenceInputError(
            f"{what}: 'data' holds {len(flat)} elements, shape {list(shape)} needs {count}"
        )
    if datatype == "BOOL":
        ok: type | tuple[type, ...] = bool
        expected = "true or false"
    elif datatype == "BYTES":
        ok, expected = str, "a string"
    elif datatype.startswith("FP"):
        ok, expected = (int, float), "a number"
    else:
        ok, expected = int, "an integer"
    bad = _first_bad(flat, ok)
    if bad is not None:
        raise InferenceInputError(
            f"{what}: data element {bad} is {_json_kind(flat[bad])}, {datatype} needs {expected}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [_utf8(s, position, what) for position, s in enumerate(flat)]
        return array.reshape(shape)
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except OverflowError:
        dtype = DATATYPES[datatype]
        span = f" ({np.iinfo(dtype).min}..{np.iinfo(dtype).max})" if dtype.kind in "iu" else ""
        raise InferenceInputError(
            f"{what}: a data element is out of range for {datatype}{span}"
        ) from None


def _utf8(text: str, position: int, what: str) -> bytes:
    # JSON's "\ud800" escape is valid JSON, and Python's reader turns it into a str with
    # a lone surrogate, which has no UTF-8 form.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InferenceInputError(
            f"{what}: data element {position} holds a lone UTF-16 surrogate, which is not "
            f"text; send such bytes as binary data"
        ) from None


def _parse_outputs(
    raw: object, metadata: ModelMetadata, binary_output: bool
) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InferenceInputError("'outputs' must be a list of requested outputs")
    known = {spec.name for spec in metadata.outputs}
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for position, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise InferenceInputError(f"outputs[{position}] must be an object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InferenceInputError(f"outputs[{position}] needs a string 'name'")
        what = f"requested output {name!r}"
        if name not in known:
            expected = ", ".join(map(repr, (s.name for s in metadata.outputs))) or "none"
            raise InferenceInputError(f"unknown {what}; the model's outputs are {expected}")
        if name in seen:
            raise InferenceInputError(f"{what} is asked for more than once")
        seen.add(name)
        params = _parameters(entry.get("parameters"), what)
        if "classification" in params:
            raise InferenceInputError(f"{what}: the classification extension is not supported")
        for key in _SHARED_MEMORY_PARAMS:
            if key in params:
                raise InferenceInputError(f"{what}: shared-memory tensors are not supported")
        binary = (
            _bool_param(params, "binary_data", what) if "binary_data" in params else binary_output
        )
        requested.append(RequestedOutput(name=name, binary=binary, parameters=params))
    return tuple(requested)


# -- responses --------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of an output array; raises :class:`BackendError` for a dtype
    the protocol cannot carry."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return "BOOL"
    if kind in "iu" and size in (1, 2, 4, 8):
        return f"{'INT' if kind == 'i' else 'UINT'}{size * 8}"
    if kind == "f" and size in (2, 4, 8):
        return f"FP{size * 8}"
    if kind in "OSU":
        return "BYTES"
    raise BackendError(f"an output of dtype {array.dtype} has no Open Inference Protocol datatype")


def _json_data(array: np.ndarray, datatype: str, name: str) -> list[Any]:
    if datatype != "BYTES":
        flat: list[Any] = array.ravel(order="C").tolist()
        return flat
    out: list[str] = []
    for element in array.ravel(order="C").tolist():
        if isinstance(element, str):
            out.append(element)
            continue
        try:
            out.append(_element_bytes(element).decode("utf-8"))
        except UnicodeDecodeError:
            raise InferenceInputError(
                f"output {name!r} holds bytes that are not UTF-8 text; ask for it with "
                f"parameters.binary_data=true"
            ) from None
    return out


def _binary_data(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    wire = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    return np.ascontiguousarray(array, dtype=wire).tobytes()


def encode_inference_response(
    *,
    model_name: str,
    model_version: str,
    request: InferenceRequest,
    results: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any] | None = None,
) -> EncodedResponse:
    """The response to ``request`` from a model's ``results``.

    Outputs are those the request asked for, in its order, or else every result (as the
    binary form, if ``binary_data_output`` was set). A requested output missing from
    ``results`` is the backend's fault: :class:`BackendError`.
    """
    if request.outputs is None:
        chosen = [(name, array, request.binary_output) for name, array in results.items()]
    else:
        chosen = []
        for wanted in request.outputs:
            if wanted.name not in results:
                raise BackendError(f"the model returned no output {wanted.name!r}")
            chosen.append((wanted.name, results[wanted.name], wanted.binary))

    outputs_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value, binary in chosen:
        array = np.asarray(value)
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = _binary_data(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array, datatype, name)
        outputs_json.append(entry)

    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = dict(parameters)
    document["outputs"] = outputs_json
    head = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return EncodedResponse(body=head, header_length=None)
    return EncodedResponse(body=b"".join([head, *blobs]), header_length=len(head))
