"""ONNX plumbing shared by the split and the quantizer.

Loading with one-line errors, the model's input/output signatures, sample data that a model
accepts (random or from an ``.npz``), and onnxruntime sessions. onnx's exceptions are
translated into :class:`ModelError` here; onnxruntime's are mapped by
:func:`~fogline.compression._ort_errors.onnxruntime_errors`, the one map for the whole
distribution.
"""

from __future__ import annotations

import difflib
import importlib
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from fogline.compression._ort_errors import ORT_PREFIX
from fogline.compression.errors import ModelError

__all__ = [
    "Dim",
    "TensorSpec",
    "bind_unnamed",
    "coerce",
    "concrete_shape",
    "describe_shape",
    "input_specs",
    "load_model",
    "load_samples",
    "make_session",
    "one_line",
    "output_specs",
    "random_inputs",
    "run_session",
    "shape_matches",
    "spec_of",
    "suggest",
    "validate_feeds",
]

Dim = int | str | None
"""One dimension: a fixed size, a named dynamic axis (``"batch"``), or an unnamed dynamic axis."""

# protobuf ships no type stubs; its parse error is looked up rather than imported
_DecodeError: type[Exception] = importlib.import_module("google.protobuf.message").DecodeError

_MASK_NAME = re.compile(r"mask", re.IGNORECASE)


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first meaningful line of an error message, shortened: fit for ``error: …``."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    # onnxruntime prefixes messages with "[ONNXRuntimeError] : 1 : FAIL : "
    line = ORT_PREFIX.sub("", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a known name is close to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input, output or cut tensor."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }


def describe_shape(shape: Sequence[Dim] | None) -> str:
    """``[batch, 3, 32, 32]`` with dynamic axes by name (``?`` when unnamed)."""
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.STRING:
        return "str"
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def spec_of(value_info: onnx.ValueInfoProto) -> TensorSpec:
    """The :class:`TensorSpec` of an ONNX value info (tensor types only)."""
    tensor_type = value_info.type.tensor_type
    dtype = _dtype_name(tensor_type.elem_type) if tensor_type.elem_type else "unknown"
    if not tensor_type.HasField("shape"):
        return TensorSpec(value_info.name, dtype, None)
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorSpec(value_info.name, dtype, tuple(dims))


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (weights)."""
    weights = {init.name for init in model.graph.initializer}
    return [spec_of(vi) for vi in model.graph.input if vi.name not in weights]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [spec_of(vi) for vi in model.graph.output]


def load_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX model file, or raise :class:`ModelError` saying what is wrong.

    Protobuf parses many non-ONNX byte strings without complaint, so the result is also
    checked for a graph and an opset before the ONNX checker validates it.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path))
    except _DecodeError as exc:
        raise ModelError(f"{path}: not an ONNX model (cannot be parsed as one)") from exc
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{path}: not an ONNX model ({one_line(exc)})") from exc
    if not model.opset_import or not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph outputs or opset)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{path}: invalid ONNX model: {one_line(exc)}") from exc
    return model


_NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive of .npy files
_NPY_MAGIC = b"\x93NUMPY"


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an ``.npz`` (or a single ``.npy``: key ``""``).

    A file that is neither (a CSV, a text file named ``.npz``), an archive member that is
    not an array, or an array of pickled Python objects is a :class:`ModelError` that says
    so in one line; nothing is ever unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        with path.open("rb") as file:
            head = file.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not head.startswith((*_NPZ_MAGIC, _NPY_MAGIC)):
        raise ModelError(f"{path}: not an .npz file (numpy.savez writes one: name=array, ...)")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError:
        if head.startswith(_NPY_MAGIC):  # numpy refuses to unpickle an object array
            raise ModelError(f"{path}: holds pickled Python objects, not numbers") from None
        raise ModelError(f"{path}: not a readable .npz file") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path}: not a readable .npz file ({one_line(exc)})") from None
    if isinstance(data, np.ndarray):
        return {"": _numeric(path, "", data)}
    arrays: dict[str, np.ndarray] = {}
    with data:
        for name in data.files:
            try:
                array = np.asarray(data[name])
            except ValueError:
                raise ModelError(
                    f"{path}: {name!r} holds pickled Python objects, not numbers"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ModelError(
                    f"{path}: {name!r} is not a NumPy array ({one_line(exc)})"
                ) from None
            if array.ndim == 0 and array.dtype.kind == "S":
                # a zip member that is no .npy file comes back as its raw bytes
                raise ModelError(f"{path}: {name!r} is not a NumPy array")
            arrays[name] = _numeric(path, name, array)
    if not arrays:
        raise ModelError(f"{path}: holds no arrays")
    return arrays


def _numeric(path: Path, name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "biufc":
        what = f"{name!r}" if name else "the array"
        raise ModelError(f"{path}: {what} holds {array.dtype} values, not numbers")
    return array


def concrete_shape(
    spec: TensorSpec,
    *,
    batch_size: int,
    dynamic_size: int,
    named: dict[str, int],
) -> tuple[int, ...]:
    """A concrete shape for ``spec``: dynamic axis 0 gets ``batch_size``, others ``dynamic_size``.

    Axes that share a name (``"seq"`` in ids and mask) get the same size across inputs,
    recorded in ``named``.
    """
    if spec.shape is None:
        raise ModelError(f"input {spec.name!r} has no known rank; give sample inputs instead")
    dims: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
            continue
        size = batch_size if axis == 0 else dynamic_size
        if isinstance(dim, str):
            size = named.setdefault(dim, size)
        dims.append(size)
    return tuple(dims)


def random_inputs(
    specs: Sequence[TensorSpec],
    *,
    seed: int = 0,
    batch_size: int = 2,
    dynamic_size: int = 8,
) -> dict[str, np.ndarray]:
    """Random inputs any well-formed model accepts.

    Floats are standard normal; uint8 (pixels) spans 0–255. Other integers (token ids,
    indices) are 0 or 1, which every vocabulary, embedding table and index range admits.
    Inputs whose name contains ``mask`` are all ones (nothing masked out), whatever their type.
    """
    rng = np.random.default_rng(seed)
    named: dict[str, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = concrete_shape(spec, batch_size=batch_size, dynamic_size=dynamic_size, named=named)
        if spec.dtype == "str":
            feeds[spec.name] = np.full(shape, "a", dtype=object)
            continue
        if spec.dtype == "unknown":
            raise ModelError(f"input {spec.name!r} has an unknown element type")
        dtype = spec.np_dtype
        if _MASK_NAME.search(spec.name):
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind == "f" or dtype.name == "bfloat16":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.uint8:
            feeds[spec.name] = rng.integers(0, 256, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ModelError(f"input {spec.name!r} has unsupported type {spec.dtype}")
    return feeds


def _kind(dtype: np.dtype[Any]) -> str:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return "float"
    if dtype.kind == "c":  # never cast to a real type: the imaginary part would be dropped
        return "complex"
    if dtype.kind in "iu":
        return "integer"
    if dtype.kind == "b":
        return "bool"
    return "string" if dtype.kind in "OUS" else dtype.kind


def coerce(spec: TensorSpec, array: np.ndarray, what: str) -> np.ndarray:
    """``array`` cast to the input's dtype when only the width differs (float64 → float32).

    A different kind (floats for an int64 input) is a :class:`ModelError`.
    """
    if spec.dtype in {"unknown", "str"}:
        return array
    want = spec.np_dtype
    if array.dtype == want:
        return array
    if _kind(array.dtype) != _kind(want):
        raise ModelError(
            f"{what} {spec.name!r} is {array.dtype}; the model expects {spec.dtype} "
            f"{describe_shape(spec.shape)}"
        )
    if _kind(want) == "integer":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ModelError(f"{what} {spec.name!r} has values outside the range of {spec.dtype}")
    return array.astype(want)


def shape_matches(expected: Sequence[Dim], got: Sequence[int]) -> bool:
    """Same rank, and every fixed axis of ``expected`` has its size in ``got``."""
    if len(expected) != len(got):
        return False
    return all(
        not isinstance(e, int) or e <= 0 or e == g for e, g in zip(expected, got, strict=True)
    )


def bind_unnamed(
    specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Name a lone unnamed array (``.npy``, or ``arr_0`` from ``np.savez``) after the input."""
    names = list(arrays)
    if (
        len(specs) == 1
        and len(names) == 1
        and names[0] != specs[0].name
        and (names[0] == "" or re.fullmatch(r"arr_\d+", names[0]))
    ):
        return {specs[0].name: arrays[names[0]]}
    return dict(arrays)


def validate_feeds(
    specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray], what: str = "input"
) -> dict[str, np.ndarray]:
    """Check one batch of inputs against the model's inputs; return them cast to its dtypes."""
    arrays = bind_unnamed(specs, arrays)
    known = [s.name for s in specs]
    for name in arrays:
        if name not in known:
            raise ModelError(
                f"{what} {name!r} is not an input of the model{suggest(name, known)}; "
                f"inputs: {', '.join(known)}"
            )
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise ModelError(
                f"{what} {spec.name!r} is missing (expected {spec.dtype} "
                f"{describe_shape(spec.shape)})"
            )
        array = np.asarray(arrays[spec.name])
        if spec.shape is not None and not shape_matches(spec.shape, array.shape):
            raise ModelError(
                f"{what} {spec.name!r} has shape {list(array.shape)}; "
                f"expected {describe_shape(spec.shape)}"
            )
        feeds[spec.name] = coerce(spec, array, what)
    return feeds


def make_session(
    model: onnx.ModelProto | Path | bytes, *, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session with full graph optimization and quiet logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr clean
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(model, onnx.ModelProto):
        source: str | bytes = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_session(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run all outputs; return them by name."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}
