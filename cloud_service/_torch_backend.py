"""A backend that runs an ONNX cloud part with torch: CUDA graphs on a GPU, eager on a CPU.

The ONNX graph is converted here, by a small explicit op table (:data:`_OPS`), into a torch
module that walks the graph's nodes in order (ONNX requires them to be topologically
sorted). Not onnx2torch: it pulls in torchvision, lags the ONNX opsets that the exporters
write, and a converter we do not own would make the one GPU backend that can be verified
depend on a third party's op coverage. The cloud parts we serve are small feed-forward
graphs (Gemm/MatMul, Add, Relu, Softmax, and the convolution and pooling ops of CNN tails),
so the table is short, and an op outside it is refused at load time with the op and the
node named, rather than failing on the first request.

On CUDA, one CUDA graph is captured per batch size the batcher forms (1..``max_batch_size``
by default, or ``batch_sizes``), each with static input and output buffers; a batch is
copied into the buffers of the smallest captured size that holds it, the tail rows are
zeroed, the graph is replayed and the first rows of its outputs are returned. Padding is
sound because a served model treats the rows of a batch independently (every model the
batcher feeds must, or batching itself would change answers). On a CPU the same module
runs eagerly, which is what the CPU tests compare against onnxruntime.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from fogline.cloud_service.errors import BackendError

__all__ = ["TorchBackend", "convert_onnx", "supported_ops"]

log = logging.getLogger("fogline.cloud.torch")
# One capture at a time in the process: versions loading side by side take turns.
_CAPTURE_LOCK = threading.Lock()

# ONNX TensorProto element types → torch dtype names (looked up on torch when converting).
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


@dataclass(frozen=True)
class _Node:
    """One graph node, ready to run: its function, the value names it reads and writes."""

    op: str
    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class _Converted:
    """The pieces of a converted graph; :func:`convert_onnx` wraps them in a module."""

    def __init__(self) -> None:
        self.constants: dict[str, Any] = {}
        self.nodes: list[_Node] = []
        self.inputs: list[tuple[str, Any, tuple[int | str, ...]]] = []
        self.outputs: list[str] = []


# --- the op table -------------------------------------------------------------------------
#
# Each entry takes (attributes, constant inputs, node) at conversion time and returns
# the function to run at inference time. Attributes and shape-like inputs (Reshape's shape,
# Unsqueeze's axes) are read once here, so that the function does no host work that a CUDA
# graph capture would forbid.


_Builder = Callable[[dict[str, Any], list[Any], Any], Callable[..., Any]]
_OPS: dict[str, _Builder] = {}


def _op(*names: str) -> Callable[[_Builder], _Builder]:
    def register(builder: _Builder) -> _Builder:
        for name in names:
            _OPS[name] = builder
        return builder

    return register


def supported_ops() -> tuple[str, ...]:
    """The ONNX op types this backend converts, sorted."""
    return tuple(sorted(_OPS))


def _const_ints(node: Any, consts: list[Any], index: int, what: str) -> list[int] | None:
    """Input ``index`` as a list of ints when it is a constant, None when it is absent."""
    if index >= len(node.input) or not node.input[index]:
        return None
    value = consts[index]
    if value is None:
        raise BackendError(
            f"{node.op_type} node {node.name or node.output[0]!r} needs a constant {what}; "
            "shapes computed at run time are not supported"
        )
    return [int(v) for v in value.reshape(-1).tolist()]


@_op("Gemm")
def _gemm(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))

    def gemm(a: Any, b: Any, c: Any = None) -> Any:
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is None:
            return alpha * (a @ b) if alpha != 1.0 else a @ b
        if alpha == 1.0 and beta == 1.0:
            return torch.addmm(c, a, b) if c.dim() <= 2 else a @ b + c
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


@_op("MatMul")
def _matmul(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    return torch.matmul


@_op("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
def _binary(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    fns: dict[str, Callable[..., Any]] = {
        "Add": torch.add,
        "Sub": torch.sub,
        "Mul": torch.mul,
        "Div": torch.div,
        "Pow": torch.pow,
        "Max": torch.maximum,
        "Min": torch.minimum,
    }
    fn = fns[node.op_type]
    if node.op_type in ("Max", "Min"):  # variadic in ONNX

        def fold(*xs: Any) -> Any:
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out

        return fold
    return fn


@_op("Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Erf", "Identity")
def _unary(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    fns: dict[str, Callable[..., Any]] = {
        "Relu": torch.relu,
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Exp": torch.exp,
        "Log": torch.log,
        "Sqrt": torch.sqrt,
        "Neg": torch.neg,
        "Abs": torch.abs,
        "Erf": torch.erf,
        "Identity": lambda x: x,
    }
    return fns[node.op_type]


@_op("LeakyRelu")
def _leaky(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    slope = float(attrs.get("alpha", 0.01))
    return lambda x: torch.nn.functional.leaky_relu(x, slope)


@_op("Gelu")
def _gelu(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    approximate = str(attrs.get("approximate", "none"))
    return lambda x: torch.nn.functional.gelu(x, approximate=approximate)


@_op("Clip")
def _clip(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    # Opset < 11 gives the bounds as attributes; later opsets as optional inputs.
    low, high = attrs.get("min"), attrs.get("max")

    def clip(x: Any, lo: Any = None, hi: Any = None) -> Any:
        lo = low if lo is None else lo
        hi = high if hi is None else hi
        return torch.clamp(x, lo, hi)

    return clip


@_op("Softmax", "LogSoftmax")
def _softmax(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    opset = int(attrs.get("__opset__", 13))
    axis = int(attrs.get("axis", -1 if opset >= 13 else 1))
    if opset >= 13:
        return lambda x: fn(x, axis)

    # Before opset 13 the input is coerced to 2-D at ``axis`` and normalised per row.
    def coerced(x: Any) -> Any:
        a = axis % x.dim()
        rows = math.prod(x.shape[:a])
        return fn(x.reshape(rows, -1), 1).reshape(x.shape)

    return coerced


@_op("Flatten")
def _flatten(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    axis = int(attrs.get("axis", 1))

    def flatten(x: Any) -> Any:
        a = axis % x.dim() if x.dim() else 0
        return x.reshape(math.prod(x.shape[:a]), -1)

    return flatten


@_op("Reshape")
def _reshape(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    shape = _const_ints(node, consts, 1, "shape") or []
    allow_zero = bool(attrs.get("allowzero", 0))

    def reshape(x: Any, _shape: Any = None) -> Any:
        # ONNX's 0 copies the input's dimension (unless allowzero); torch has no such code.
        dims = [x.shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(shape)]
        return x.reshape(dims)

    return reshape


@_op("Transpose")
def _transpose(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    perm = attrs.get("perm")

    def transpose(x: Any) -> Any:
        return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))

    return transpose


@_op("Unsqueeze", "Squeeze")
def _squeeze(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    # Opset 13 moved axes from an attribute to an input.
    axes = attrs.get("axes")
    if axes is None:
        axes = _const_ints(node, consts, 1, "axes")
    if node.op_type == "Unsqueeze":
        if axes is None:
            raise BackendError(f"Unsqueeze node {node.name or node.output[0]!r} has no axes")
        wanted = list(axes)

        def unsqueeze(x: Any, _axes: Any = None) -> Any:
            rank = x.dim() + len(wanted)
            for a in sorted(a % rank for a in wanted):
                x = x.unsqueeze(a)
            return x

        return unsqueeze
    chosen = None if axes is None else list(axes)

    def squeeze(x: Any, _axes: Any = None) -> Any:
        if chosen is None:
            return x.squeeze()
        return x.squeeze(tuple(a % x.dim() for a in chosen))

    return squeeze


@_op("Concat")
def _concat(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    axis = int(attrs["axis"])
    return lambda *xs: torch.cat(xs, axis)


@_op("Cast")
def _cast(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    to = int(attrs["to"])
    if to not in _ONNX_DTYPES:
        raise BackendError(f"Cast node {node.name or node.output[0]!r} to ONNX type {to}")
    dtype = getattr(torch, _ONNX_DTYPES[to])
    return lambda x: x.to(dtype)


def _spatial(attrs: dict[str, Any], node: Any, rank: int) -> tuple[list[int], list[int], list[int]]:
    """Strides, symmetric padding and dilations of a Conv/pool node (``rank`` spatial axes)."""
    if str(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        raise BackendError(
            f"{node.op_type} node {node.name or node.output[0]!r}: auto_pad "
            f"{attrs['auto_pad']} is not supported (export with explicit pads)"
        )
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    if pads[:rank] != pads[rank:]:
        raise BackendError(
            f"{node.op_type} node {node.name or node.output[0]!r}: asymmetric pads {pads}"
        )
    return strides, pads[:rank], dilations


@_op("Conv")
def _conv(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    kernel = attrs.get("kernel_shape")
    weight = consts[1]
    rank = len(kernel) if kernel is not None else (weight.ndim - 2 if weight is not None else 2)
    if rank not in (1, 2, 3):
        raise BackendError(f"Conv node {node.name or node.output[0]!r} has {rank} spatial axes")
    strides, pads, dilations = _spatial(attrs, node, rank)
    groups = int(attrs.get("group", 1))
    fn = getattr(torch.nn.functional, f"conv{rank}d")
    return lambda x, w, b=None: fn(x, w, b, strides, pads, dilations, groups)


@_op("MaxPool", "AveragePool")
def _pool(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    if rank not in (1, 2, 3) or len(node.output) > 1:
        raise BackendError(
            f"{node.op_type} node {node.name or node.output[0]!r}: {rank} spatial axes or "
            "an Indices output are not supported"
        )
    strides, pads, dilations = _spatial(attrs, node, rank)
    ceil = bool(attrs.get("ceil_mode", 0))
    f = torch.nn.functional
    if node.op_type == "MaxPool":
        fn = getattr(f, f"max_pool{rank}d")
        return lambda x: fn(x, kernel, strides, pads, dilations, ceil)
    if dilations != [1] * rank:
        raise BackendError(f"AveragePool node {node.name or node.output[0]!r} with dilations")
    fn = getattr(f, f"avg_pool{rank}d")
    count_pad = bool(attrs.get("count_include_pad", 0))
    return lambda x: fn(x, kernel, strides, pads, ceil, count_pad)


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    if node.op_type == "GlobalAveragePool":
        return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("BatchNormalization")
def _batchnorm(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    eps = float(attrs.get("epsilon", 1e-5))
    if len([o for o in node.output if o]) > 1:
        raise BackendError(
            f"BatchNormalization node {node.name or node.output[0]!r} is in training mode"
        )
    return lambda x, scale, bias, mean, var: torch.nn.functional.batch_norm(
        x, mean, var, scale, bias, False, 0.0, eps
    )


@_op("ReduceMean")
def _reduce_mean(attrs: dict[str, Any], consts: list[Any], node: Any) -> Callable[..., Any]:
    axes = attrs.get("axes")
    if axes is None:
        axes = _const_ints(node, consts, 1, "axes")  # an input since opset 18
    keep = bool(attrs.get("keepdims", 1))

    def reduce_mean(x: Any, _axes: Any = None) -> Any:
        dims = tuple(range(x.dim())) if not axes else tuple(a % x.dim() for a in axes)
        return x.mean(dim=dims, keepdim=keep)

    return reduce_mean


# --- conversion ---------------------------------------------------------------------------


def _attributes(node: Any, opset: int) -> dict[str, Any]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            attrs[key] = value.decode()
    attrs["__opset__"] = opset
    return attrs


def _load_model(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        return onnx.load(str(model))
    except (OSError, ValueError) as exc:  # DecodeError is a ValueError subclass
        raise BackendError(f"cannot read the cloud model {model!r}: {exc}") from exc
    except Exception as exc:  # protobuf's DecodeError, whose module path varies by version
        raise BackendError(f"cannot read the cloud model: {exc}") from exc


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return tuple(dims)


def convert_onnx(model: str | Path | bytes | onnx.ModelProto) -> OnnxGraph:
    """A torch module that computes what the ONNX graph ``model`` computes.

    ``forward`` takes the graph's inputs positionally, in graph order, and returns a tuple of
    its outputs. Raises :class:`BackendError` naming the op type and node for anything the
    op table does not cover, and for an unreadable file.
    """
    proto = _load_model(model)
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    conv = _Converted()
    for init in proto.graph.initializer:
        conv.constants[init.name] = numpy_helper.to_array(init)
    initialised = set(conv.constants)
    for value in proto.graph.input:
        if value.name in initialised:
            continue  # old exporters list initializers among the inputs too
        elem = value.type.tensor_type.elem_type
        if elem not in _ONNX_DTYPES:
            raise BackendError(f"input {value.name!r} has ONNX type {elem}, not supported")
        conv.inputs.append((value.name, getattr(torch, _ONNX_DTYPES[elem]), _dims(value)))
    for node in proto.graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            raise BackendError(f"{where} is in the custom domain {node.domain!r}, not supported")
        attrs = _attributes(node, opset)
        if node.op_type == "Constant":
            if "value" not in attrs:
                raise BackendError(f"{where}: only tensor-valued Constant nodes are supported")
            conv.constants[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        builder = _OPS.get(node.op_type)
        if builder is None:
            raise BackendError(
                f"{where} uses op {node.op_type!r}, which the torch backend does not support "
                f"(supported: {', '.join(supported_ops())})"
            )
        consts = [conv.constants.get(name) if name else None for name in node.input]
        try:
            fn = builder(attrs, consts, node)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{where} cannot be converted: {exc}") from exc
        conv.nodes.append(_Node(node.op_type, node.name, fn, tuple(node.input), tuple(node.output)))
    conv.outputs = [o.name for o in proto.graph.output]
    return OnnxGraph(conv).eval()


class OnnxGraph(torch.nn.Module):
    """The converted graph: constants as buffers (so ``.to(device)`` moves them), the nodes
    run in ONNX order over a dict of named values."""

    def __init__(self, conv: _Converted) -> None:
        super().__init__()
        self.input_specs = list(conv.inputs)
        self.output_names = list(conv.outputs)
        self._nodes = list(conv.nodes)
        self._buffer_of: dict[str, str] = {}
        for i, (name, array) in enumerate(conv.constants.items()):
            key = f"c{i}"
            self._buffer_of[name] = key
            tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
            self.register_buffer(key, tensor, persistent=False)

    def forward(self, *args: Any) -> tuple[Any, ...]:
        values: dict[str, Any] = {name: getattr(self, key) for name, key in self._buffer_of.items()}
        for (name, _dtype, _shape), arg in zip(self.input_specs, args, strict=True):
            values[name] = arg
        for node in self._nodes:
            args_in = [values[n] if n else None for n in node.inputs]
            while args_in and args_in[-1] is None:
                args_in.pop()  # trailing optional inputs left out
            out = node.fn(*args_in)
            if len(node.outputs) == 1:
                values[node.outputs[0]] = out
            else:
                for name, value in zip(node.outputs, out, strict=False):
                    values[name] = value
        return tuple(values[n] for n in self.output_names)


# --- the backend --------------------------------------------------------------------------


@dataclass
class _Captured:
    """One captured CUDA graph and the static buffers it reads and writes."""

    graph: Any
    inputs: list[Any]
    outputs: tuple[Any, ...]


class TorchBackend:
    """Runs the ONNX cloud part ``model_path`` as a converted torch module.

    ``device`` is ``"cuda"`` or ``"cpu"`` (None: CUDA when torch sees a device).
    On CUDA, ``cuda_graphs`` (default on) captures one graph per size in ``batch_sizes``
    (default 1..``max_batch_size``); a batch is padded to the next captured size. Batches
    larger than the largest captured size are refused, as TensorRT refuses batches outside
    its engine's range. ``run`` may be called from several threads; calls take turns,
    since the graphs share their static buffers.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int = 32,
        device: str | None = None,
        device_id: int = 0,
        cuda_graphs: bool = True,
        batch_sizes: Sequence[int] | None = None,
        threads: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if device not in (None, "cuda", "cpu"):
            raise ValueError(f"device must be 'cuda', 'cpu' or None, got {device!r}")
        if device_id < 0:
            raise ValueError(f"device_id must be 0 or more, got {device_id}")
        sizes = sorted(set(batch_sizes)) if batch_sizes is not None else []
        if batch_sizes is not None and (not sizes or sizes[0] < 1 or sizes[-1] > max_batch_size):
            raise ValueError(
                f"batch_sizes must be non-empty and lie in 1..{max_batch_size}, got {batch_sizes}"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise BackendError(f"torch {torch.__version__} sees no CUDA device")
            if device_id >= torch.cuda.device_count():
                raise BackendError(
                    f"CUDA device {device_id} does not exist ({torch.cuda.device_count()} visible)"
                )
            self._device = torch.device("cuda", device_id)
        else:
            self._device = torch.device("cpu")
            if threads > 0:
                torch.set_num_threads(threads)
        self._module: OnnxGraph = convert_onnx(model_path).to(self._device)
        self._specs: list[tuple[str, Any, tuple[int | str, ...]]] = self._module.input_specs
        self.output_names: tuple[str, ...] = tuple(self._module.output_names)
        self._input_names = tuple(name for name, _, _ in self._specs)
        self._max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._graphs: dict[int, _Captured] = {}
        self._sizes = sizes or list(range(1, max_batch_size + 1))
        reason = self._capture_problem() if self._device.type == "cuda" and cuda_graphs else None
        if reason is not None:
            log.warning("CUDA graphs not used for %s: %s; running eagerly", model_path, reason)
        if self._device.type == "cuda" and cuda_graphs and reason is None:
            with _CAPTURE_LOCK, torch.cuda.device(self._device):
                self._capture_all()
        self.cuda_graphs: bool = bool(self._graphs)
        log.info(
            "torch backend for %s on %s (%s)",
            model_path,
            self.device_name,
            f"CUDA graphs for batch {self._sizes[0]}..{self._sizes[-1]}, {len(self._sizes)} sizes"
            if self.cuda_graphs
            else "eager",
        )

    @property
    def name(self) -> str:
        return "torch"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def device_name(self) -> str:
        """``cpu`` or ``cuda:<n> (<GPU name>)``."""
        if self._device.type == "cpu":
            return "cpu"
        return f"{self._device} ({torch.cuda.get_device_name(self._device)})"

    @property
    def captured_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes with a captured CUDA graph (empty when running eagerly)."""
        return tuple(sorted(self._graphs))

    def padded_size(self, batch: int) -> int:
        """The captured size a batch of ``batch`` rows runs at (``batch`` itself eagerly)."""
        if not self._graphs:
            return batch
        for size in self._sizes:
            if size >= batch:
                return size
        raise BackendError(
            f"batch of {batch} is larger than the largest captured size {self._sizes[-1]}"
        )

    def _capture_problem(self) -> str | None:
        """Why graphs cannot be captured for this model, or None when they can: every input
        needs a symbolic batch axis and fixed other axes, or the static buffers have no
        single shape per batch size."""
        for name, _dtype, shape in self._specs:
            if not shape or isinstance(shape[0], int):
                return f"input {name!r} has no dynamic batch axis"
            if any(not isinstance(d, int) or d < 1 for d in shape[1:]):
                return f"input {name!r} has dynamic axes besides the batch axis"
        return None

    def _static_inputs(self, batch: int) -> list[Any]:
        return [
            torch.zeros((batch, *(int(d) for d in shape[1:])), dtype=dtype, device=self._device)
            for _name, dtype, shape in self._specs
        ]

    def _capture_all(self) -> None:
        # Largest first, in one memory pool: smaller graphs reuse the larger ones' blocks.
        # Sharing a pool is safe here because replays never overlap (one lock) and each
        # replay's outputs are copied to the host before the next replay.
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            for size in sorted(self._sizes, reverse=True):
                static = self._static_inputs(size)
                # Warm-up on a side stream, as torch requires before capture (cuBLAS
                # handles and workspaces are created lazily, which capture forbids); the
                # capture runs on the same stream, so it finds them made.
                side.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._module(*static)
                torch.cuda.current_stream(self._device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                try:
                    # thread_local: other threads (another model's batches, a version
                    # loading beside this one) may keep using CUDA during the capture.
                    with torch.cuda.graph(
                        graph, pool=pool, stream=side, capture_error_mode="thread_local"
                    ):
                        outputs = self._module(*static)
                except RuntimeError as exc:
                    raise BackendError(f"CUDA graph capture failed at batch {size}: {exc}") from exc
                self._graphs[size] = _Captured(graph, static, tuple(outputs))
        torch.cuda.synchronize(self._device)

    def _batch(self, inputs: Mapping[str, np.ndarray]) -> int:
        missing = [n for n in self._input_names if n not in inputs]
        if missing:
            raise BackendError(f"missing input(s) {', '.join(missing)}")
        sizes = {
            n: int(np.shape(inputs[n])[0]) if np.ndim(inputs[n]) else 0 for n in self._input_names
        }
        distinct = set(sizes.values())
        if len(distinct) != 1:
            raise BackendError(f"inputs disagree on the batch size: {sizes}")
        return distinct.pop()

    def _tensor(self, name: str, dtype: Any, value: np.ndarray) -> Any:
        host = np.require(value, requirements=("C_CONTIGUOUS", "WRITEABLE"))
        try:
            return torch.from_numpy(host).to(self._device, dtype)
        except TypeError as exc:
            raise BackendError(f"input {name!r}: {exc}") from exc

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self._batch(inputs)
        with self._lock, torch.inference_mode():
            if not self._graphs:
                feed = [self._tensor(n, dt, inputs[n]) for n, dt, _ in self._specs]
                try:
                    outs = self._module(*feed)
                except RuntimeError as exc:
                    raise BackendError(f"torch run failed: {exc}") from exc
                return {n: _host(t) for n, t in zip(self.output_names, outs, strict=True)}
            if batch < 1:
                raise BackendError("a batch needs at least one row")
            captured = self._graphs[self.padded_size(batch)]
            with torch.cuda.device(self._device):  # replay launches on the current device
                return self._replay(captured, inputs, batch)

    def _replay(
        self, captured: _Captured, inputs: Mapping[str, np.ndarray], batch: int
    ) -> dict[str, np.ndarray]:
        for (name, dtype, _shape), static in zip(self._specs, captured.inputs, strict=True):
            value = self._tensor(name, dtype, inputs[name])
            if tuple(value.shape[1:]) != tuple(static.shape[1:]):
                raise BackendError(
                    f"input {name!r} shape {tuple(value.shape)} does not fit the model "
                    f"({tuple(static.shape[1:])} per row)"
                )
            static[:batch].copy_(value)
            static[batch:].zero_()  # padding rows: zeros rather than a stale batch
        captured.graph.replay()
        return {
            n: _host(t[:batch]) for n, t in zip(self.output_names, captured.outputs, strict=True)
        }

    def warmup(self) -> None:
        """Run the smallest and the largest batch once (graphs are captured at load)."""
        for batch in sorted({1, self._max_batch_size if not self._graphs else self._sizes[-1]}):
            self.run(
                {
                    name: np.zeros(
                        (batch, *(d if isinstance(d, int) and d > 0 else 1 for d in shape[1:])),
                        dtype=_numpy_dtype(dtype),
                    )
                    for name, dtype, shape in self._specs
                }
            )


def _host(tensor: Any) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return np.asarray(tensor.detach().cpu().numpy())


def _numpy_dtype(dtype: Any) -> np.dtype[Any]:
    return np.dtype(str(dtype).removeprefix("torch."))
