"""Accuracy-guided INT8 quantization with onnxruntime's quantization tooling.

No single recipe suits every model: a static QDQ pass that loses nothing on a CNN can wreck
a transformer (softmax, layer norms and residual sums do not survive 8-bit activations). So
the quantizer holds out part of the calibration samples, builds a bounded set of candidates
— static QDQ with per-channel weights under MinMax, Entropy and Percentile calibration;
static with sensitive operators, or the first and last weighted layers, left in FP32; static
on matrix products and convolutions only; dynamic (weights-only) MatMul/Gemm — measures each
one's agreement with the FP32 model on the held-out samples and its latency on this machine,
and keeps the fastest that meets the agreement target.

Agreement per output is top-1 agreement for outputs that look like class scores (``[N, C]``,
2 ≤ C ≤ 1000, not named like features) and mean cosine similarity for other float outputs;
a candidate's agreement is its worst output's.

Calibration sets on which any candidate would agree — identical samples, fewer than
:data:`MIN_DISTINCT_SAMPLES` distinct ones, NaN, or FP32 outputs that do not vary over the
held-out samples — are refused before any candidate is built; narrow ones are quantized
with warnings in the report. Tensors holding infinities stay in FP32 (:class:`_Calibration`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorsData,
    create_calibrator,
    quantize_dynamic,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from fogline.compression._cpu import u8s8_saturates
from fogline.compression._onnx_util import (
    TensorSpec,
    bind_unnamed,
    coerce,
    describe_shape,
    input_specs,
    load_model,
    make_session,
    one_line,
    run_session,
    shape_matches,
    suggest,
)
from fogline.compression._ort_errors import onnxruntime_errors
from fogline.compression.errors import ModelError, QuantizationError

__all__ = [
    "DEFAULT_TARGETS",
    "CandidateResult",
    "OutputAgreement",
    "QuantizationReport",
    "quantize_model",
]

Metric = Literal["auto", "top1", "cosine"]
MeasuredMetric = Literal["top1", "cosine", "exact"]

DEFAULT_TARGETS: Mapping[str, float] = {"top1": 0.99, "cosine": 0.98, "exact": 0.99}
"""Agreement a candidate must reach per output when no target is given, by metric."""

MAX_CALIBRATION_SAMPLES = 256
"""More samples barely move MinMax/Entropy/Percentile ranges but cost time; the rest are unused."""
CALIBRATION_BATCH = 32
"""Samples per calibration and evaluation run when the model has a dynamic batch axis."""
TIMING_BATCH = 32
WARMUP_RUNS = 3
TIMED_RUNS = 12
MIN_TIMED_RUN_S = 0.002
"""A timed run repeats the batch until it lasts about this long, so tiny models time well."""

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SENSITIVE_OPS = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Erf",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Div",
        "ReduceMean",
    }
)
"""Operators whose outputs 8-bit activations describe poorly (normalizations, exponentials)."""
_ELEMENTWISE_JOINS = frozenset({"Add", "Sub", "Mul"})
"""Joins of two activations (residual sums, gates) are sensitive too; with a constant, not."""

_FEATURE_NAME = re.compile(r"feat|embed|hidden|latent|vector|pool|repr|encod", re.IGNORECASE)
_MAX_CLASSES = 1000

MIN_DISTINCT_SAMPLES = 16
"""Fewer distinct calibration samples are refused: a quarter of them is held out to measure
agreement with FP32, and agreement on a handful of samples says nothing."""
CONSTANT_OUTPUT_SPREAD = 1e-6
"""An FP32 output whose relative spread over the held-out samples (:func:`_relative_spread`)
is at most this is constant but for float rounding: every candidate agrees with a constant.
When every measured output is constant, the calibration set is refused; when some are, a
warning. (Frames of noise a millionth of a gray level deep reach 2e-8 on a small CNN.)"""
NARROW_OUTPUT_SPREAD = 1e-2
"""Below this relative spread an output barely moves over the held-out samples: a warning
that the calibration set may not be what the model sees in service. (Held-out frames of a
single class reach 5e-4 on the same CNN's class probabilities; varied ones 0.85.)"""


# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class OutputAgreement:
    """Agreement of one output of a quantized model with the FP32 model on held-out samples."""

    output: str
    metric: MeasuredMetric
    agreement: float
    target: float

    @property
    def met(self) -> bool:
        return self.agreement >= self.target - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "metric": self.metric,
            "agreement": self.agreement,
            "target": self.target,
            "met": self.met,
        }


@dataclass(frozen=True)
class CandidateResult:
    """One strategy tried: how well it agreed, how fast it ran, whether it was acceptable."""

    strategy: str
    description: str
    outputs: tuple[OutputAgreement, ...] = ()
    latency_ms: float | None = None
    speedup: float | None = None
    size_bytes: int | None = None
    error: str | None = None

    @property
    def agreement(self) -> float | None:
        """The worst output's agreement (``None`` when the candidate could not be built)."""
        return min((o.agreement for o in self.outputs), default=None)

    @property
    def margin(self) -> float:
        """Worst ``agreement − target`` over the outputs; ``-inf`` when it failed."""
        if not self.outputs:
            return -math.inf
        return min(o.agreement - o.target for o in self.outputs)

    @property
    def accepted(self) -> bool:
        return self.error is None and bool(self.outputs) and all(o.met for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "description": self.description,
            "agreement": self.agreement,
            "outputs": [o.to_dict() for o in self.outputs],
            "latency_ms": self.latency_ms,
            "speedup": self.speedup,
            "size_bytes": self.size_bytes,
            "accepted": self.accepted,
            "error": self.error,
        }


@dataclass(frozen=True)
class QuantizationReport:
    """The chosen INT8 model and everything measured on the way to it."""

    model: Path
    output: Path
    strategy: str
    description: str
    fp32_bytes: int
    int8_bytes: int
    fp32_latency_ms: float
    int8_latency_ms: float
    outputs: tuple[OutputAgreement, ...]
    target: float | None
    candidates: tuple[CandidateResult, ...]
    calibration_samples: int
    holdout_samples: int
    timing_batch: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    warnings: tuple[str, ...] = ()
    """What about the calibration set or the result deserves a look, one line each."""
    reduce_range: bool = False
    """Whether the static and dynamic candidates were built with 7-bit weights."""

    @property
    def size_ratio(self) -> float:
        """INT8 file size over FP32 file size (0.27 means 3.7× smaller)."""
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else math.nan

    @property
    def speedup(self) -> float:
        """FP32 latency over INT8 latency on this machine (onnxruntime CPU, one thread)."""
        return self.fp32_latency_ms / self.int8_latency_ms if self.int8_latency_ms else math.nan

    @property
    def agreement(self) -> float:
        """The worst output's agreement with FP32."""
        return min(o.agreement for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "output": str(self.output),
            "strategy": self.strategy,
            "description": self.description,
            "fp32_bytes": self.fp32_bytes,
            "int8_bytes": self.int8_bytes,
            "size_ratio": self.size_ratio,
            "fp32_latency_ms": self.fp32_latency_ms,
            "int8_latency_ms": self.int8_latency_ms,
            "speedup": self.speedup,
            "agreement": self.agreement,
            "metric": {o.output: o.metric for o in self.outputs},
            "target": (
                self.target
                if self.target is not None
                else {o.output: o.target for o in self.outputs}
            ),
            "outputs": [o.to_dict() for o in self.outputs],
            "candidates": [c.to_dict() for c in self.candidates],
            "calibration_samples": self.calibration_samples,
            "holdout_samples": self.holdout_samples,
            "timing_batch": {k: list(v) for k, v in self.timing_batch.items()},
            "elapsed_s": self.elapsed_s,
            "warnings": list(self.warnings),
            "reduce_range": self.reduce_range,
        }


# ----------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class _Samples:
    """Calibration data as ``units``: ``arrays[name][i]`` is what one run feeds for sample ``i``.

    When every input has a dynamic batch axis, one sample is one row (``arrays[name][i]`` has
    a batch axis of 1) and samples are concatenated into larger batches; otherwise each
    sample is a whole input (a fixed-batch chunk, or an array of full inputs).
    """

    arrays: Mapping[str, np.ndarray]
    count: int
    combinable: bool

    def batches(self, indices: Sequence[int], max_samples: int) -> Iterator[dict[str, np.ndarray]]:
        step = max_samples if self.combinable else 1
        for start in range(0, len(indices), step):
            chunk = list(indices[start : start + step])
            if self.combinable:
                yield {
                    name: arr[chunk].reshape(-1, *arr.shape[2:])
                    for name, arr in self.arrays.items()
                }
            else:
                yield {name: arr[chunk[0]] for name, arr in self.arrays.items()}


def _units(spec: TensorSpec, array: np.ndarray) -> tuple[np.ndarray, bool]:
    """``array`` as ``[samples, *one run's input]``, and whether samples can share a run."""
    if spec.shape is None:
        raise ModelError(f"input {spec.name!r} has no known rank; cannot check its samples")
    expected, got = list(spec.shape), list(array.shape)
    if len(got) == len(expected) + 1 and shape_matches(expected, got[1:]):
        return array, False  # an extra leading axis of whole inputs
    if got and shape_matches(expected[1:], got[1:]) and len(got) == len(expected):
        first = expected[0]
        if not (isinstance(first, int) and first > 0):
            return array.reshape(got[0], 1, *got[1:]), True  # rows of a dynamic batch
        if got[0] % first == 0:
            return array.reshape(got[0] // first, first, *got[1:]), False  # fixed-size batches
    raise ModelError(
        f"calibration input {spec.name!r} has shape {got}; expected "
        f"{describe_shape(expected)} (samples along the batch axis) or "
        f"{describe_shape(['samples', *expected])}"
    )


def _samples(specs: Sequence[TensorSpec], calibration: Mapping[str, np.ndarray]) -> _Samples:
    """Check calibration arrays against the model inputs and cut them into samples.

    Each array holds samples along its first axis: either the model's batch axis (same rank
    as the input) or an extra leading axis of whole inputs (rank + 1).
    """
    if not isinstance(calibration, Mapping):
        raise TypeError("calibration must map input names to arrays")
    arrays_in = bind_unnamed(specs, calibration)
    known = [s.name for s in specs]
    for name in arrays_in:
        if name not in known:
            raise ModelError(
                f"calibration input {name!r} is not an input of the model"
                f"{suggest(name, known)}; inputs: {', '.join(known)}"
            )
    units: dict[str, np.ndarray] = {}
    combinable = True
    for spec in specs:
        if spec.name not in arrays_in:
            raise ModelError(
                f"calibration input {spec.name!r} is missing (expected {spec.dtype} "
                f"{describe_shape(spec.shape)}, samples along the first axis)"
            )
        array = coerce(spec, np.asarray(arrays_in[spec.name]), "calibration input")
        units[spec.name], shareable = _units(spec, array)
        combinable = combinable and shareable
    counts = {name: len(arr) for name, arr in units.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise ModelError(f"calibration inputs disagree on the number of samples ({listed})")
    count = next(iter(counts.values()), 0)
    for name, arr in units.items():
        if arr.dtype.kind == "f" and (nans := int(np.count_nonzero(np.isnan(arr)))):
            raise ModelError(f"calibration input {name!r} holds NaN in {nans} of {arr.size} values")
    _check_distinct(units, count)
    return _Samples(units, count, combinable)


def _check_distinct(units: Mapping[str, np.ndarray], count: int) -> None:
    """Refuse calibration sets that are constant or have too few distinct samples.

    A sample is what one model run gets for every input together; two samples are the same
    when all their bytes are. 64 all-zero frames, say, are one sample 64 times: every
    candidate agrees with FP32 on it, whatever it does to real inputs.
    """
    digests = set()
    for i in range(count):
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(units):
            digest.update(np.ascontiguousarray(units[name][i]).tobytes())
        digests.add(digest.digest())
    distinct = len(digests)
    if count > 1 and distinct == 1:
        raise ModelError(
            f"all {count} calibration samples are identical (a constant input, such as blank "
            "frames): agreement measured on them says nothing about real inputs; "
            "calibrate with real samples"
        )
    if distinct < MIN_DISTINCT_SAMPLES:
        of = f" of {count}" if distinct != count else ""
        raise ModelError(
            f"calibration needs at least {MIN_DISTINCT_SAMPLES} distinct samples, "
            f"got {distinct}{of}"
        )


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds prepared batches to onnxruntime's calibrators; supports ranged collection."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._start = 0
        self._end = len(self._feeds)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        feed = self._feeds[self._pos]
        self._pos += 1
        return feed

    def rewind(self) -> None:
        self._pos = self._start

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = start_index, min(end_index, len(self._feeds))
        self._pos = self._start


# ----------------------------------------------------------------------------- metrics


# Timing noise on a shared machine is a few percent. Among accepted candidates within this
# margin of the fastest, the first in search order wins, so a rebuild picks the same one.
SPEED_TIE = 0.05


def _fastest(accepted: Iterable[CandidateResult]) -> CandidateResult:
    ranked = list(accepted)
    best = min(r.latency_ms or math.inf for r in ranked)
    return next(r for r in ranked if (r.latency_ms or math.inf) <= best * (1 + SPEED_TIE))


def _choose_metric(name: str, reference: np.ndarray, requested: Metric) -> MeasuredMetric:
    if reference.dtype.kind not in "fc":
        return "exact"
    if requested == "top1":
        return "top1" if reference.ndim >= 2 else "cosine"
    if requested == "cosine":
        return "cosine"
    looks_like_classes = reference.ndim == 2 and 2 <= reference.shape[1] <= _MAX_CLASSES
    return "top1" if looks_like_classes and not _FEATURE_NAME.search(name) else "cosine"


def _agreement(metric: MeasuredMetric, reference: np.ndarray, got: np.ndarray) -> float:
    if reference.shape != got.shape:
        return 0.0
    if metric == "exact":
        return float(np.mean(reference == got)) if reference.size else 1.0
    if metric == "top1":
        return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(got, axis=-1)))
    a = reference.astype(np.float64)
    b = np.nan_to_num(got.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim >= 2 and a[0].size > 1:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    else:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / np.maximum(norm_a * norm_b, 1e-300))
    return float(np.clip(np.mean(cos), -1.0, 1.0))


def _collect(
    session: Any, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        out = run_session(session, feed)
        for n in names:
            parts[n].append(out[n])
    joined: dict[str, np.ndarray] = {}
    for n, arrays in parts.items():
        if all(a.ndim >= 1 for a in arrays):
            joined[n] = np.concatenate(arrays, axis=0)
        else:
            joined[n] = np.stack(arrays)
    return joined


def _time_interleaved(
    sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Best time of one run per session, in ms, timed in interleaved rounds.

    Interleaving spreads whatever else the machine is doing evenly over the models being
    compared, and the best of several runs estimates the unloaded speed. Each timed run
    repeats the batch until it lasts about ``MIN_TIMED_RUN_S`` so tiny models time well.
    """
    repeats: dict[str, int] = {}
    for name, session in sessions.items():
        for _ in range(WARMUP_RUNS):
            session.run(None, feed)
        start = time.perf_counter()
        session.run(None, feed)
        once = max(time.perf_counter() - start, 1e-7)
        repeats[name] = max(1, min(1000, math.ceil(MIN_TIMED_RUN_S / once)))
    best = dict.fromkeys(sessions, math.inf)
    for _ in range(TIMED_RUNS):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                session.run(None, feed)
            best[name] = min(best[name], (time.perf_counter() - start) / repeats[name])
    return {name: 1000.0 * value for name, value in best.items()}


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class _Recipe:
    strategy: str
    description: str
    dynamic: bool = False
    method: str = "MinMax"
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    const_weights_only: bool = False


@dataclass
class _ModelFacts:
    """What the recipes need to know about the prepared model's nodes."""

    sensitive: list[str]
    ends: list[str]
    weighted: list[str]
    has_matmul: bool

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _ModelFacts:
        graph = model.graph
        constants = {t.name for t in graph.initializer}
        constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
        sensitive: list[str] = []
        weighted: list[int] = []
        for index, node in enumerate(graph.node):
            inputs = [i for i in node.input if i]
            if node.op_type in SENSITIVE_OPS or (
                node.op_type in _ELEMENTWISE_JOINS
                and len(inputs) == 2
                and not any(i in constants for i in inputs)
            ):
                sensitive.append(node.name)
            if node.op_type in WEIGHTED_OPS and len(inputs) >= 2 and inputs[1] in constants:
                weighted.append(index)
        # first layers: no weighted layer upstream; last layers: none downstream
        weighted_set = set(weighted)
        upstream: list[bool] = []
        for node in graph.node:
            parents = [p for i in node.input if (p := producer.get(i)) is not None]
            upstream.append(any(p in weighted_set or upstream[p] for p in parents))
        consumers: dict[int, list[int]] = {}
        for index, node in enumerate(graph.node):
            for i in node.input:
                if (p := producer.get(i)) is not None:
                    consumers.setdefault(p, []).append(index)
        downstream = [False] * len(graph.node)
        for index in reversed(range(len(graph.node))):
            downstream[index] = any(
                c in weighted_set or downstream[c] for c in consumers.get(index, [])
            )
        firsts = [i for i in weighted if not upstream[i]]
        lasts = [i for i in weighted if not downstream[i]]
        ends = sorted(set(firsts) | set(lasts))
        return cls(
            sensitive=sensitive,
            ends=[graph.node[i].name for i in ends],
            weighted=[graph.node[i].name for i in weighted],
            has_matmul=any(graph.node[i].op_type in {"MatMul", "Gemm"} for i in weighted),
        )


def _first_recipes() -> list[_Recipe]:
    return [
        _Recipe(
            f"static-{method.lower()}",
            f"static QDQ, per-channel int8 weights, uint8 activations, {method} calibration",
            method=method,
        )
        for method in ("MinMax", "Entropy", "Percentile")
    ]


def _more_recipes(facts: _ModelFacts, method: str) -> list[_Recipe]:
    m = method.lower()
    recipes: list[_Recipe] = []
    if facts.sensitive:
        recipes.append(
            _Recipe(
                f"static-{m}-fp32-sensitive",
                f"static QDQ ({method}) with {len(facts.sensitive)} sensitive operators "
                "(softmax, normalization, GELU, sigmoid, residual sums) in FP32",
                method=method,
                exclude=tuple(facts.sensitive),
            )
        )
    if facts.weighted:
        recipes.append(
            _Recipe(
                f"static-{m}-weighted-only",
                f"static QDQ ({method}) on convolutions and matrix products with constant "
                "weights only; everything else in FP32",
                method=method,
                op_types=WEIGHTED_OPS,
                const_weights_only=True,
            )
        )
    if facts.ends and len(facts.ends) < len(facts.weighted):
        recipes.append(
            _Recipe(
                f"static-{m}-fp32-ends",
                f"static QDQ ({method}) with the first and last weighted layers "
                f"({len(facts.ends)}) in FP32",
                method=method,
                exclude=tuple(facts.ends),
            )
        )
    if facts.has_matmul:
        recipes.append(
            _Recipe(
                "dynamic-matmul",
                "dynamic quantization: int8 MatMul/Gemm weights, activations quantized at run time",
                dynamic=True,
            )
        )
    return recipes


def _last_resort(facts: _ModelFacts, method: str) -> list[_Recipe]:
    """The most conservative static recipe, tried only when nothing else met the target."""
    if not facts.weighted or not (facts.ends and len(facts.ends) < len(facts.weighted)):
        return []
    m = method.lower()
    return [
        _Recipe(
            f"static-{m}-weighted-only-fp32-ends",
            f"static QDQ ({method}) on inner convolutions and matrix products only",
            method=method,
            exclude=tuple(facts.ends),
            op_types=WEIGHTED_OPS,
            const_weights_only=True,
        )
    ]


# ----------------------------------------------------------------------------- building


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: exclusion lists refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{index}"
            name = base
            while name in seen:
                name += "_"
            node.name = name
        seen.add(node.name)


def _prepare(model: onnx.ModelProto, work: Path) -> Path:
    """Shape inference and graph optimization before quantization (``quant_pre_process``).

    Symbolic shape inference fails on some models; it is skipped then, and optimization too
    if need be: quantization still works, only less of the graph may be quantized.
    """
    named = onnx.ModelProto()
    named.CopyFrom(model)
    _name_nodes(named)
    source = work / "named.onnx"
    onnx.save(named, str(source))
    target = work / "prepared.onnx"
    for options in (
        {},
        {"skip_symbolic_shape": True},
        {"skip_symbolic_shape": True, "skip_optimization": True},
    ):
        try:
            quant_pre_process(str(source), str(target), **options)
            prepared = onnx.load(str(target))
        except Exception:  # noqa: BLE001, S112 - the preprocessor raises anything; fall back
            continue
        _name_nodes(prepared)
        onnx.save(prepared, str(target))
        return target
    return source


def _gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm`` with constant weights as ``MatMul`` (+ ``Add``).

    onnxruntime's dynamic quantization handles MatMul but not Gemm; this lets it reach the
    fully connected layers of CNN heads and MLPs too.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        convertible = (
            node.op_type == "Gemm"
            and len(node.input) >= 2
            and node.input[1] in weights
            and float(attrs.get("alpha", 1.0)) == 1.0
            and float(attrs.get("beta", 1.0)) == 1.0
            and int(attrs.get("transA", 0)) == 0
        )
        if not convertible:
            nodes.append(node)
            continue
        weight = node.input[1]
        if int(attrs.get("transB", 0)):
            transposed = numpy_helper.to_array(weights[weight]).T.copy()
            weight = f"{weight}_transposed_{node.name}"
            graph.initializer.append(numpy_helper.from_array(transposed, weight))
        has_bias = len(node.input) >= 3 and bool(node.input[2])
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"
            )
        )
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    return out


class _DropToolChatter(logging.Filter):
    """Drops the quantization tooling's own log records (progress notes, hints)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep onnxruntime's quantization tooling off stdout (``--json`` output) and the log.

    Its calibrators ``print`` progress, it logs hints on the root logger, and numpy warns.
    """
    root = logging.getLogger()
    chatter = _DropToolChatter()
    root.addFilter(chatter)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            np.errstate(all="ignore"),
        ):
            # ranges of tensors holding infinities (masked attention) trip numpy warnings;
            # such candidates are judged by their measured agreement like any other
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(chatter)


def _relative_spread(values: np.ndarray) -> float:
    """How much an output moves from sample to sample, relative to its size: the mean over
    its elements of their standard deviation across samples (the first axis), over the
    output's root mean square. 0 for an output that is the same for every sample; about 1
    for one that varies as much as it is large. Infinities and NaN count as 0."""
    if values.ndim == 0 or len(values) < 2:
        return math.inf  # nothing to compare
    rows = values.astype(np.float64).reshape(len(values), -1)
    rows = np.where(np.isfinite(rows), rows, 0.0)
    rms = float(np.sqrt(np.mean(rows**2)))
    if rms == 0.0:
        return 0.0
    return float(np.mean(np.std(rows, axis=0)) / rms)


def _check_outputs(
    reference: Mapping[str, np.ndarray], metrics: Mapping[str, MeasuredMetric]
) -> list[str]:
    """Refuse a calibration set on which the FP32 model's measured outputs do not vary (every
    candidate would agree with them); the warnings for outputs that vary little."""
    spreads = {name: _relative_spread(values) for name, values in reference.items()}
    constant = [name for name, spread in spreads.items() if spread <= CONSTANT_OUTPUT_SPREAD]
    if constant and len(constant) == len(spreads):
        listed = ", ".join(f"{name!r} {spreads[name]:.1e}" for name in constant)
        raise ModelError(
            "the FP32 model's outputs do not vary over the held-out calibration samples "
            f"(relative spread {listed}; at most {CONSTANT_OUTPUT_SPREAD:g} is constant): "
            "every INT8 model would agree with them; calibrate with samples like those "
            "the model serves"
        )
    warnings: list[str] = []
    for name, spread in spreads.items():
        if spread <= CONSTANT_OUTPUT_SPREAD:
            warnings.append(
                f"output {name!r} is constant over the held-out samples (relative spread "
                f"{spread:.1e}): its agreement measures nothing; measure the other outputs only"
            )
        elif spread < NARROW_OUTPUT_SPREAD:
            warnings.append(
                f"output {name!r} barely varies over the held-out samples (relative spread "
                f"{spread:.1e} < {NARROW_OUTPUT_SPREAD:g}): are the calibration samples like "
                "the inputs the model serves?"
            )
    for name, metric in metrics.items():
        if metric == "top1" and len(np.unique(np.argmax(reference[name], axis=-1))) == 1:
            warnings.append(
                f"every held-out sample has the same top class on {name!r}: its top-1 "
                "agreement covers one class only"
            )
    return warnings


def _finite_range(data: Any) -> bool:
    low, high = data.range_value
    return bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))


class _Calibration:
    """The activation ranges of the prepared model, one calibration per method, computed
    with onnxruntime's own calibrators and handed to ``quantize_static`` as its calibration
    cache, so that recipes sharing a method share its ranges.

    Tensors that take infinite (or NaN) values on the calibration samples — an attention
    mask added as -inf, a log of zero — have no 8-bit range: MinMax would make one of
    [-inf, x] and ruin the model, the histogram calibrators (Entropy, Percentile) stop with
    "range ... is not finite". They are found from the MinMax ranges, left out of every
    calibration and of the ranges, and the nodes that produce or read them stay in FP32;
    the rest of the model is quantized as usual. onnxruntime has no option for this.
    """

    def __init__(self, prepared: Path, feeds: Sequence[dict[str, np.ndarray]], work: Path) -> None:
        self._prepared = prepared
        self._feeds = feeds
        self._work = work
        self._files: dict[str, Path] = {}
        self._nonfinite: frozenset[str] | None = None

    def nonfinite(self) -> frozenset[str]:
        """The tensors that hold infinities or NaN on the calibration samples."""
        if self._nonfinite is None:
            self.cache("MinMax")  # sets it
        return self._nonfinite or frozenset()

    def fp32_nodes(self) -> list[str]:
        """The nodes that produce or read a tensor of :meth:`nonfinite`: kept in FP32."""
        tensors = self.nonfinite()
        if not tensors:
            return []
        graph = onnx.load(str(self._prepared)).graph
        return [
            node.name
            for node in graph.node
            if any(name in tensors for name in (*node.input, *node.output))
        ]

    def cache(self, method: str) -> Path:
        """The calibration cache file of ``method`` (computed on first use)."""
        if method not in self._files:
            skip = frozenset() if method == "MinMax" else self.nonfinite()
            ranges = self._calibrate(method, skip)
            if method == "MinMax":
                self._nonfinite = frozenset(k for k, v in ranges.items() if not _finite_range(v))
                skip = self._nonfinite
            kept = {name: data for name, data in ranges.items() if name not in skip}
            path = self._work / f"ranges-{method}.json"
            save_tensors_data(TensorsData(ranges.calibration_method, kept), path)
            self._files[method] = path
        return self._files[method]

    def _calibrate(self, method: str, skip: frozenset[str]) -> Any:
        calibrator = create_calibrator(
            self._prepared,
            None,
            augmented_model_path=str(self._work / f"augmented-{method}.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        chosen = getattr(calibrator, "tensors_to_calibrate", None)
        if skip and chosen is not None:
            # the histogram calibrators collect exactly these tensors
            calibrator.tensors_to_calibrate = set(chosen) - skip
        reader = _Reader(self._feeds)
        for start in range(len(reader)):  # one batch at a time: bounded memory
            reader.set_range(start, start + 1)
            calibrator.collect_data(reader)
        return calibrator.compute_data()


def _build(
    recipe: _Recipe,
    prepared: Path,
    target: Path,
    calibration: Sequence[dict[str, np.ndarray]],
    ranges: _Calibration,
    reduce_range: bool,
) -> None:
    if recipe.dynamic:
        rewritten = _gemm_as_matmul(onnx.load(str(prepared)))
        source = target.with_suffix(".matmul.onnx")
        onnx.save(rewritten, str(source))
        with _quiet():
            quantize_dynamic(
                str(source),
                str(target),
                op_types_to_quantize=["MatMul"],
                per_channel=False,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        return
    model = onnx.load(str(prepared))
    extra: dict[str, Any] = {"CalibStridedMinMax": 1, "MatMulConstBOnly": recipe.const_weights_only}
    exact = _exact_casts(model)
    if exact:
        extra["TensorQuantOverrides"] = {
            name: [{"scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}]
            for name in exact
        }
    with _quiet():
        cache = ranges.cache(recipe.method)
        quantize_static(
            str(prepared),
            str(target),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*recipe.exclude, *ranges.fp32_nodes()],
            calibrate_method=getattr(CalibrationMethod, recipe.method),
            extra_options=extra,
            calibration_cache_path=cache,
        )
    if exact:
        quantized = onnx.load(str(target))
        if _skip_exact_quantize(quantized):
            onnx.save(quantized, str(target))


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the tensors whose type is declared or found by shape inference."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - fall back to the declared types
        graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.HasField("tensor_type")
    }
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types


def _uint8_casts(model: onnx.ModelProto, types: Mapping[str, int]) -> list[onnx.NodeProto]:
    return [
        node
        for node in model.graph.node
        if node.op_type == "Cast"
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
        and types.get(node.input[0]) == onnx.TensorProto.UINT8
    ]


def _exact_casts(model: onnx.ModelProto) -> list[str]:
    """Float casts of uint8 tensors (image pixels, typically): whole numbers 0–255, which
    uint8 with scale 1 and zero point 0 holds exactly, whatever range the calibration
    samples happened to reach. Quantized that way, they need no quantizing at run time
    (:func:`_skip_exact_quantize`)."""
    return [node.output[0] for node in _uint8_casts(model, _tensor_types(model))]


def _skip_exact_quantize(model: onnx.ModelProto) -> bool:
    """Rewire ``uint8 x → Cast(float) → QuantizeLinear(scale 1, zero point 0, uint8)`` to
    ``x`` itself, which that pair reproduces exactly (every uint8 value is its own float
    and its own quantized value), and drop the nodes left unused. Returns whether it
    changed anything. Hand-written: onnxruntime's graph optimizer keeps the pair."""
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    casts = {node.output[0]: node for node in _uint8_casts(model, _tensor_types(model))}
    outputs = {o.name for o in graph.output}

    def const(node: onnx.NodeProto, i: int) -> np.ndarray | None:
        name = node.input[i] if len(node.input) > i else ""
        return numpy_helper.to_array(consts[name]) if name in consts else None

    rename: dict[str, str] = {}
    for node in graph.node:
        cast = casts.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if cast is None or node.output[0] in outputs:
            continue
        scale, zero = const(node, 1), const(node, 2)
        if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) != 1.0:
            continue
        if zero is None or zero.dtype != np.uint8 or zero.size != 1 or zero.reshape(-1)[0]:
            continue
        rename[node.output[0]] = cast.input[0]
    if not rename:
        return False
    kept = [n for n in graph.node if n.op_type != "QuantizeLinear" or n.output[0] not in rename]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for node in kept for name in node.input} | outputs
    kept = [n for n in kept if n.output[0] not in casts or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    return True


@dataclass
class _Bench:
    """The FP32 reference on the held-out samples: outputs, metrics and targets."""

    holdout: list[dict[str, np.ndarray]]
    reference: dict[str, np.ndarray]
    metrics: dict[str, MeasuredMetric]
    targets: dict[str, float]

    def agreement(self, path: Path) -> tuple[OutputAgreement, ...]:
        got = _collect(make_session(path), self.holdout, list(self.metrics))
        return tuple(
            OutputAgreement(
                name,
                metric,
                _agreement(metric, self.reference[name], got[name]),
                self.targets[name],
            )
            for name, metric in self.metrics.items()
        )


def _summary(result: CandidateResult) -> str:
    if result.error is not None:
        return f"{result.strategy}: failed ({result.error})"
    worst = min(result.outputs, key=lambda o: o.agreement - o.target)
    verdict = "meets" if result.accepted else "misses"
    return (
        f"{result.strategy}: {worst.metric} {worst.agreement:.4f} on {worst.output!r} "
        f"({verdict} target {worst.target:.10g})"
    )


def quantize_model(
    model: Path,
    calibration: Mapping[str, np.ndarray],
    output: Path,
    *,
    target: float | None = None,
    metric: Literal["auto", "top1", "cosine"] = "auto",
    outputs: Sequence[str] | None = None,
    holdout_fraction: float = 0.25,
    progress: Callable[[str], None] | None = None,
    reduce_range: bool | None = None,
) -> QuantizationReport:
    """Quantize ``model`` to INT8, keeping the fastest strategy that agrees with FP32.

    ``calibration`` maps each model input to samples along the first axis (the batch axis,
    or an extra leading axis of whole inputs). A fixed share of the samples
    (``holdout_fraction``, chosen with a fixed seed) is held out to measure agreement; the
    rest calibrate. ``outputs`` names the outputs to measure (default: every float output);
    ``metric`` forces top-1 or cosine instead of choosing per output; ``target`` is the
    agreement every measured output must reach (default: 0.99 for top-1, 0.98 for cosine).
    Latency is measured with onnxruntime on this CPU, one intra-op thread, on the same
    batch for FP32 and every candidate.

    ``reduce_range`` builds every candidate with 7-bit weights, which no CPU's INT8 kernels
    saturate (:func:`~fogline.compression._cpu.u8s8_saturates`); ``None`` (the default)
    chooses it where this CPU's would — x86 without VNNI — so that agreement measured here
    is agreement the model has here. A model quantized on a VNNI host for x86 devices
    without VNNI should pass ``True``.

    Writes the chosen model to ``output`` and returns the report. Raises
    :class:`ModelError` for an unusable model or calibration data, and
    :class:`QuantizationError` when no candidate meets the target (naming the best reached).
    """
    started = time.perf_counter()
    say = progress if progress is not None else (lambda _msg: None)
    if metric not in ("auto", "top1", "cosine"):
        raise ValueError(f"metric must be 'auto', 'top1' or 'cosine', not {metric!r}")
    if target is not None and (not math.isfinite(target) or target <= 0):
        raise ValueError(f"target must be a positive number, not {target!r}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), not {holdout_fraction!r}")
    model_path, output_path = Path(model), Path(output)
    if output_path.exists() and output_path.resolve() == model_path.resolve():
        raise ValueError("output must not overwrite the model being quantized")
    if target is not None and target > 1.0:
        raise QuantizationError(
            f"target {target:g} cannot be met: agreement with FP32 is at most 1.0"
        )

    seven_bit = u8s8_saturates() if reduce_range is None else bool(reduce_range)
    proto = load_model(model_path)
    specs = input_specs(proto)
    samples = _samples(specs, calibration)
    order = np.random.default_rng(0).permutation(samples.count).tolist()
    n_holdout = min(samples.count - 1, max(1, round(samples.count * holdout_fraction)))
    holdout_idx = sorted(order[:n_holdout])
    calib_idx = sorted(order[n_holdout:])[:MAX_CALIBRATION_SAMPLES]

    with onnxruntime_errors(into=ModelError, what=f"{model_path}: onnxruntime cannot load it"):
        fp32 = make_session(model_path)
    all_outputs = [o.name for o in fp32.get_outputs()]
    for name in outputs or ():
        if name not in all_outputs:
            raise ModelError(
                f"{name!r} is not an output of the model{suggest(name, all_outputs)}; "
                f"outputs: {', '.join(all_outputs)}"
            )

    say(f"measuring FP32 on {len(holdout_idx)} held-out samples")
    holdout = list(samples.batches(holdout_idx, CALIBRATION_BATCH))
    with onnxruntime_errors(into=ModelError, what="the model rejects the calibration data"):
        reference = _collect(fp32, holdout, all_outputs)
    measured = (
        list(outputs) if outputs else [n for n in all_outputs if reference[n].dtype.kind == "f"]
    )
    if not measured:
        raise ModelError(
            "the model has no floating-point outputs to compare; name outputs to measure"
        )
    metrics = {n: _choose_metric(n, reference[n], metric) for n in measured}
    warnings = _check_outputs({n: reference[n] for n in measured}, metrics)
    targets = {n: target if target is not None else DEFAULT_TARGETS[m] for n, m in metrics.items()}
    bench = _Bench(holdout, {n: reference[n] for n in measured}, metrics, targets)
    calibration_feeds = list(samples.batches(calib_idx, CALIBRATION_BATCH))
    timing_feed = next(samples.batches((holdout_idx + calib_idx)[:TIMING_BATCH], TIMING_BATCH))

    with tempfile.TemporaryDirectory(prefix="fogline-quant-") as tmp:
        work = Path(tmp)
        say("preparing the model (shape inference, graph optimization)")
        prepared = _prepare(proto, work)
        facts = _ModelFacts.of(onnx.load(str(prepared)))
        ranges = _Calibration(prepared, calibration_feeds, work)
        built: dict[str, Path] = {}

        def attempt(recipe: _Recipe) -> CandidateResult:
            path = work / f"{recipe.strategy}.onnx"
            say(f"trying {recipe.strategy}")
            description = recipe.description + ("; 7-bit weights" if seven_bit else "")
            try:
                _build(recipe, prepared, path, calibration_feeds, ranges, seven_bit)
                agreement = bench.agreement(path)
                if not recipe.dynamic and (kept := ranges.fp32_nodes()):
                    description += f"; {len(kept)} nodes on infinite values in FP32"
            except Exception as exc:  # noqa: BLE001 - a recipe may fail on some model; try the next
                result = CandidateResult(recipe.strategy, description, error=one_line(exc))
            else:
                result = CandidateResult(
                    recipe.strategy, description, agreement, size_bytes=path.stat().st_size
                )
                built[recipe.strategy] = path
            say(_summary(result))
            return result

        first = [attempt(r) for r in _first_recipes()]
        usable = [r for r in first if r.error is None]
        method = "MinMax"
        if usable:
            best = max(usable, key=lambda r: r.margin)
            method = {"static-entropy": "Entropy", "static-percentile": "Percentile"}.get(
                best.strategy, "MinMax"
            )
        results = first + [attempt(r) for r in _more_recipes(facts, method)]
        if not any(r.accepted for r in results):
            results += [attempt(r) for r in _last_resort(facts, method)]

        accepted = [r for r in results if r.accepted]
        if not accepted:
            raise _no_candidate(results)

        say(f"timing FP32 and {len(built)} candidates")
        sessions = {"": make_session(model_path, threads=1)}
        for strategy, path in built.items():
            sessions[strategy] = make_session(path, threads=1)
        latency = _time_interleaved(sessions, timing_feed)
        del sessions
        fp32_ms = latency[""]
        results = [
            replace(r, latency_ms=latency[r.strategy], speedup=fp32_ms / latency[r.strategy])
            if r.strategy in latency
            else r
            for r in results
        ]
        chosen = _fastest(r for r in results if r.accepted)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[chosen.strategy], output_path)

    report = QuantizationReport(
        model=model_path,
        output=output_path,
        strategy=chosen.strategy,
        description=chosen.description,
        fp32_bytes=model_path.stat().st_size,
        int8_bytes=output_path.stat().st_size,
        fp32_latency_ms=fp32_ms,
        int8_latency_ms=chosen.latency_ms or math.nan,
        outputs=chosen.outputs,
        target=target,
        candidates=tuple(results),
        calibration_samples=len(calib_idx),
        holdout_samples=len(holdout_idx),
        timing_batch={k: tuple(int(d) for d in v.shape) for k, v in timing_feed.items()},
        elapsed_s=time.perf_counter() - started,
        warnings=tuple(warnings),
        reduce_range=seven_bit,
    )
    say(
        f"chose {chosen.strategy}: {report.speedup:.2f}× FP32 speed, "
        f"{report.size_ratio:.2f}× FP32 size"
    )
    return report


def _no_candidate(results: Sequence[CandidateResult]) -> QuantizationError:
    """The error when nothing met the target: names the best agreement reached and the target."""
    built = [r for r in results if r.error is None]
    if not built:
        return QuantizationError(
            "every quantization strategy failed: "
            + "; ".join(f"{r.strategy}: {r.error}" for r in results)
        )
    top = max(built, key=lambda r: r.margin)
    worst = min(top.outputs, key=lambda o: o.agreement - o.target)
    return QuantizationError(
        f"no INT8 strategy met the agreement target: best was {worst.metric} "
        f"{_below(worst.agreement, worst.target)} on output {worst.output!r} with "
        f"{top.strategy}, target {worst.target:.10g} ({len(results)} strategies tried)"
    )


def _below(value: float, target: float) -> str:
    """``value`` with enough decimals to show that it is below ``target`` (0.99996 ≠ 1.0000)."""
    for digits in range(4, 12):
        text = f"{value:.{digits}f}"
        if float(text) < target:
            return text
    return f"{value:.12f}"
