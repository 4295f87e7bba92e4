"""Cut an ONNX model into an edge part and a cloud part, and prove the cut.

The edge part computes the cut tensors (and every original output that does not depend on
them); the cloud part takes the cut tensors as its only inputs and computes the remaining
outputs. Whatever else the cloud part would need from before the cut — an original input
such as an attention mask read by later layers, or an earlier intermediate read by a skip
connection — is added to the cut and emitted by the edge, so the cloud part never needs the
raw inputs or recomputes edge work.

A cut is proven by running the original model and edge → cloud on the same inputs (random
ones any model accepts, and optionally given ones) and comparing every original output.

The graph surgery is written here rather than with :class:`onnx.utils.Extractor` because the
extractor follows only explicit node inputs (it drops outer-scope tensors that ``If``/``Loop``
bodies read), needs a value info for every boundary name, and cannot express pass-through
inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from fogline.compression._onnx_util import (
    TensorSpec,
    input_specs,
    load_model,
    make_session,
    one_line,
    random_inputs,
    run_session,
    spec_of,
    suggest,
    validate_feeds,
)
from fogline.compression._ort_errors import onnxruntime_errors
from fogline.compression.errors import ModelError, SplitError

__all__ = [
    "CLOUD_FILE",
    "EDGE_FILE",
    "REPORT_FILE",
    "BoundaryTensor",
    "OutputCheck",
    "ProofCase",
    "SplitReport",
    "split_model",
]

EDGE_FILE = "edge.onnx"
CLOUD_FILE = "cloud.onnx"
REPORT_FILE = "split.json"
INPUT_COPY_SUFFIX = "__edge"
"""Suffix of the edge output that carries an original input through to the cloud part."""

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
_DYNAMIC_SIZES = (8, 32, 128)
"""Sizes tried for dynamic non-batch axes in random inputs, smallest first: some models
(strided convolutions, fixed pooling windows) reject small spatial sizes."""

Origin = Literal["cut", "input", "skip"]


@dataclass(frozen=True)
class BoundaryTensor:
    """One tensor crossing the cut: edge output and cloud input of the same name.

    ``origin`` says why it crosses: ``cut`` (asked for), ``input`` (an original input the
    cloud part reads, passed through by the edge as ``source``), ``skip`` (an intermediate
    computed before the cut and read after it).
    """

    name: str
    source: str
    origin: Origin
    spec: TensorSpec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "origin": self.origin} | {
            k: v for k, v in self.spec.to_dict().items() if k != "name"
        }


@dataclass(frozen=True)
class OutputCheck:
    """How closely edge → cloud reproduced one original output on one set of inputs."""

    output: str
    part: Literal["edge", "cloud"]
    max_abs_error: float
    max_rel_error: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "part": self.part,
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ProofCase:
    """One set of inputs the cut was checked on (``random`` or ``given``).

    ``status`` is ``passed``, ``failed`` (an output differs or a part failed to run), or
    ``skipped`` (the original model itself rejects random inputs while given inputs exist).
    """

    name: str
    status: Literal["passed", "failed", "skipped"]
    checks: tuple[OutputCheck, ...] = ()
    detail: str = ""
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class SplitReport:
    """What was cut where, and the proof that edge → cloud reproduces the original."""

    model: Path
    edge_model: Path
    cloud_model: Path
    requested_cut: tuple[str, ...]
    boundary: tuple[BoundaryTensor, ...]
    edge_outputs: tuple[str, ...]
    cloud_outputs: tuple[str, ...]
    edge_nodes: int
    cloud_nodes: int
    rtol: float
    atol: float
    cases: tuple[ProofCase, ...]

    @property
    def passed(self) -> bool:
        """True when at least one case ran and none failed."""
        ran = [c for c in self.cases if c.status != "skipped"]
        return bool(ran) and all(c.status == "passed" for c in ran)

    @property
    def cut(self) -> tuple[str, ...]:
        """Names of every tensor crossing the cut: the cloud part's inputs, in order."""
        return tuple(b.name for b in self.boundary)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "edge_model": str(self.edge_model),
            "cloud_model": str(self.cloud_model),
            "requested_cut": list(self.requested_cut),
            "cut": list(self.cut),
            "boundary": [b.to_dict() for b in self.boundary],
            "edge_outputs": list(self.edge_outputs),
            "cloud_outputs": list(self.cloud_outputs),
            "edge_nodes": self.edge_nodes,
            "cloud_nodes": self.cloud_nodes,
            "rtol": self.rtol,
            "atol": self.atol,
            "passed": self.passed,
            "cases": [c.to_dict() for c in self.cases],
        }


def _json_float(value: float) -> float | str:
    return value if np.isfinite(value) else str(value)


# ------------------------------------------------------------------------ graph analysis


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors read by the node's subgraphs (``If`` branches, ``Loop`` bodies)."""
    refs: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            refs |= _outer_refs(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for graph in attr.graphs:
                refs |= _outer_refs(graph)
    return refs


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    defined = {v.name for v in graph.input}
    defined |= {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        used |= _subgraph_refs(node)
        defined.update(name for name in node.output if name)
    used.update(v.name for v in graph.output)
    return used - defined


def _consumed(node: onnx.NodeProto) -> list[str]:
    """Every tensor the node reads, including through its subgraphs."""
    names = [name for name in node.input if name]
    names.extend(sorted(_subgraph_refs(node) - set(names)))
    return names


@dataclass
class _Graph:
    """Index of the top-level graph: who produces what, which names are weights or inputs."""

    model: onnx.ModelProto
    producer: dict[str, int]
    weights: set[str]
    inputs: list[str]
    outputs: list[str]
    consumed: list[list[str]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        graph = model.graph
        weights = {t.name for t in graph.initializer}
        weights |= {t.values.name for t in graph.sparse_initializer}
        producer: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    producer[name] = index
        return cls(
            model=model,
            producer=producer,
            weights=weights,
            inputs=[v.name for v in graph.input if v.name not in weights],
            outputs=[v.name for v in graph.output],
            consumed=[_consumed(node) for node in graph.node],
        )

    def ancestors(self, targets: Sequence[str], stop: set[str]) -> tuple[set[int], list[str]]:
        """Nodes needed to compute ``targets`` without looking past ``stop``.

        Returns the node indices and the non-weight names the nodes read that they do not
        produce themselves (in order of first appearance): the part's inputs.
        """
        nodes: set[int] = set()
        stack = [t for t in targets if t not in stop]
        while stack:
            name = stack.pop()
            index = self.producer.get(name)
            if index is None or index in nodes:
                continue
            nodes.add(index)
            stack.extend(n for n in self.consumed[index] if n not in stop)
        produced = {out for i in nodes for out in self.model.graph.node[i].output if out}
        leaves: list[str] = []
        for index in sorted(nodes):
            for name in self.consumed[index]:
                if name not in produced and name not in self.weights and name not in leaves:
                    leaves.append(name)
        return nodes, leaves

    def downstream(self, sources: set[str]) -> set[str]:
        """Every tensor that depends on any of ``sources`` (nodes are in topological order)."""
        dirty = set(sources)
        for index, node in enumerate(self.model.graph.node):
            if any(name in dirty for name in self.consumed[index]):
                dirty.update(out for out in node.output if out)
        return dirty


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos by name, after ONNX shape inference where it succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        inferred = model
    infos: dict[str, onnx.ValueInfoProto] = {}
    for source in (model, inferred):
        for vi in (*source.graph.value_info, *source.graph.input, *source.graph.output):
            if vi.type.tensor_type.elem_type or vi.name not in infos:
                infos[vi.name] = vi
    return infos


_ORT_TYPES = {
    "tensor(float)": onnx.TensorProto.FLOAT,
    "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(bfloat16)": onnx.TensorProto.BFLOAT16,
    "tensor(double)": onnx.TensorProto.DOUBLE,
    "tensor(int8)": onnx.TensorProto.INT8,
    "tensor(uint8)": onnx.TensorProto.UINT8,
    "tensor(int16)": onnx.TensorProto.INT16,
    "tensor(uint16)": onnx.TensorProto.UINT16,
    "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(uint32)": onnx.TensorProto.UINT32,
    "tensor(int64)": onnx.TensorProto.INT64,
    "tensor(uint64)": onnx.TensorProto.UINT64,
    "tensor(bool)": onnx.TensorProto.BOOL,
    "tensor(string)": onnx.TensorProto.STRING,
}


def _fill_missing_types(
    model: onnx.ModelProto, names: Sequence[str], infos: dict[str, onnx.ValueInfoProto]
) -> None:
    """Ask onnxruntime for the types ONNX shape inference could not give (custom ops)."""
    missing = [n for n in names if not (n in infos and infos[n].type.tensor_type.elem_type)]
    if not missing:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in missing:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    with onnxruntime_errors(into=SplitError, what=f"cannot tell the type of {', '.join(missing)}"):
        session = make_session(probe)
    for out in session.get_outputs():
        if out.name in missing and out.type in _ORT_TYPES:
            shape = [d if isinstance(d, int) else (d or None) for d in out.shape]
            infos[out.name] = helper.make_tensor_value_info(out.name, _ORT_TYPES[out.type], shape)
    still = [n for n in missing if n not in infos]
    if still:
        raise SplitError(f"cannot tell the type of {', '.join(still)}")


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def _part(
    model: onnx.ModelProto,
    *,
    name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    infos: Mapping[str, onnx.ValueInfoProto],
    meta: Mapping[str, str],
) -> onnx.ModelProto:
    """A model of ``nodes`` with the weights and value infos they use, same opsets and IR."""
    used: set[str] = set()
    for node in nodes:
        used.update(_consumed(node))
        used.update(node.output)
    graph = model.graph
    boundary = {v.name for v in inputs} | {v.name for v in outputs}
    part_graph = helper.make_graph(
        list(nodes),
        f"{graph.name or 'model'}_{name}",
        list(inputs),
        list(outputs),
        initializer=[t for t in graph.initializer if t.name in used],
        value_info=[infos[n] for n in sorted(used - boundary) if n in infos],
        sparse_initializer=[t for t in graph.sparse_initializer if t.values.name in used],
    )
    part = helper.make_model(
        part_graph,
        opset_imports=list(model.opset_import),
        producer_name="fogline",
        functions=list(model.functions),
    )
    part.ir_version = model.ir_version
    part.doc_string = model.doc_string
    for prop in model.metadata_props:
        part.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in meta.items():
        part.metadata_props.add(key=key, value=value)
    return part


@dataclass(frozen=True)
class _Plan:
    edge: onnx.ModelProto
    cloud: onnx.ModelProto
    boundary: tuple[BoundaryTensor, ...]
    edge_outputs: tuple[str, ...]
    cloud_outputs: tuple[str, ...]


def _plan(model: onnx.ModelProto, cut: Sequence[str], model_path: Path) -> _Plan:
    g = _Graph.of(model)
    for name in cut:
        if name in g.producer or name in g.inputs:
            continue
        if name in g.weights:
            raise ModelError(f"{name!r} is a weight (initializer), not a computed tensor")
        known = list(g.producer) + g.inputs
        raise ModelError(f"no tensor named {name!r} in {model_path.name}{suggest(name, known)}")

    cut_set = set(cut)
    after = g.downstream(cut_set)
    edge_outputs = [o for o in g.outputs if o in cut_set or o not in after]
    cloud_outputs = [o for o in g.outputs if o not in edge_outputs]
    shown = ", ".join(cut)
    if not cloud_outputs:
        raise SplitError(
            f"the cut at {shown} does not separate anything: every output is computed before it"
        )
    edge_nodes, _ = g.ancestors([*cut, *edge_outputs], stop=set(g.inputs))
    if not edge_nodes:
        raise SplitError(
            f"the cut at {shown} does not separate anything: the edge part would compute nothing"
        )
    edge_made = {out for i in edge_nodes for out in model.graph.node[i].output if out}
    stop = cut_set | edge_made | set(g.inputs)
    cloud_nodes, cloud_needs = g.ancestors(cloud_outputs, stop=stop)

    # The boundary: requested tensors first, then what the cloud also reads from before the cut.
    order: list[tuple[str, Origin]] = [(n, "input" if n in g.inputs else "cut") for n in cut]
    for name in cloud_needs:
        if name not in cut_set:
            order.append((name, "input" if name in g.inputs else "skip"))

    infos = _value_infos(model)
    _fill_missing_types(model, [n for n, _ in order], infos)
    taken = set(g.producer) | set(g.inputs) | g.weights
    boundary: list[BoundaryTensor] = []
    for source, origin in order:
        name = source
        if origin == "input":
            name = source + INPUT_COPY_SUFFIX
            while name in taken:
                name += "_"
            taken.add(name)
        boundary.append(
            BoundaryTensor(name, source, origin, spec_of(_renamed(infos[source], name)))
        )

    passthrough = [b for b in boundary if b.origin == "input"]
    output_infos = {v.name: v for v in model.graph.output}
    input_infos = {v.name: v for v in model.graph.input}
    meta = {"fogline.cut": json.dumps([b.name for b in boundary])}

    nodes = model.graph.node
    edge_node_list = [nodes[i] for i in sorted(edge_nodes)]
    edge_node_list += [
        helper.make_node("Identity", [b.source], [b.name], name=f"pass_{b.name}")
        for b in passthrough
    ]
    edge_reads = {n for node in edge_node_list for n in _consumed(node)} | set(edge_outputs)
    edge_inputs = [input_infos[n] for n in g.inputs if n in edge_reads]
    edge_out_infos = [output_infos[o] for o in edge_outputs]
    edge_out_infos += [
        _renamed(infos[b.source], b.name) for b in boundary if b.name not in edge_outputs
    ]
    edge = _part(
        model,
        name="edge",
        nodes=edge_node_list,
        inputs=edge_inputs,
        outputs=edge_out_infos,
        infos=infos,
        meta=meta | {"fogline.part": "edge"},
    )

    cloud_node_list = [
        helper.make_node("Identity", [b.name], [b.source], name=f"unpass_{b.name}")
        for b in passthrough
    ]
    cloud_node_list += [nodes[i] for i in sorted(cloud_nodes)]
    cloud = _part(
        model,
        name="cloud",
        nodes=cloud_node_list,
        inputs=[_renamed(infos[b.source], b.name) for b in boundary],
        outputs=[output_infos[o] for o in cloud_outputs],
        infos=infos,
        meta=meta | {"fogline.part": "cloud"},
    )
    for part_name, part in (("edge", edge), ("cloud", cloud)):
        try:
            onnx.checker.check_model(part)
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise SplitError(f"the {part_name} part is not a valid model: {one_line(exc)}") from exc
    return _Plan(edge, cloud, tuple(boundary), tuple(edge_outputs), tuple(cloud_outputs))


# ------------------------------------------------------------------------------- proof


def _compare(
    output: str, part: Literal["edge", "cloud"], ref: np.ndarray, got: np.ndarray, tol: _Tolerance
) -> OutputCheck:
    if ref.shape != got.shape:
        return OutputCheck(
            output,
            part,
            math.inf,
            math.inf,
            passed=False,
            detail=f"shape {got.shape} != {ref.shape}",
        )
    if ref.size == 0:
        return OutputCheck(output, part, 0.0, 0.0, passed=True)
    if ref.dtype.kind not in "fciub":
        same = bool(np.array_equal(ref, got))
        return OutputCheck(output, part, 0.0 if same else math.inf, 0.0, passed=same)
    a = ref.astype(np.float64)
    b = got.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return OutputCheck(
            output, part, math.nan, math.nan, passed=False, detail="NaN where the original has none"
        )
    same = (a == b) | nan_a  # equal infinities and NaN in both places count as equal
    diff = np.nan_to_num(np.where(same, 0.0, np.abs(a - b)), nan=np.inf)
    magnitude = np.where(np.isfinite(a), np.abs(a), 0.0)
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(magnitude, max(tol.atol, 1e-30))).max())
    passed = bool((diff <= tol.atol + tol.rtol * magnitude).all())
    return OutputCheck(output, part, max_abs, max_rel, passed=passed)


@dataclass(frozen=True)
class _Tolerance:
    rtol: float
    atol: float


@dataclass(frozen=True)
class _Prover:
    """Runs the original model and edge → cloud on the same inputs and compares outputs."""

    original: Any
    edge: Any
    cloud: Any
    plan: _Plan
    tol: _Tolerance

    def case(self, name: str, feeds: Mapping[str, np.ndarray]) -> ProofCase:
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in feeds.items()}
        reference = run_session(self.original, feeds)
        # a part that fails is a failed case, not an error: map, then catch
        try:
            with onnxruntime_errors(into=SplitError, what="edge part failed"):
                edge_out = run_session(self.edge, feeds)
        except SplitError as exc:
            return ProofCase(name, "failed", detail=str(exc), input_shapes=shapes)
        try:
            with onnxruntime_errors(into=SplitError, what="cloud part failed"):
                cloud_out = run_session(
                    self.cloud, {b.name: edge_out[b.name] for b in self.plan.boundary}
                )
        except SplitError as exc:
            return ProofCase(name, "failed", detail=str(exc), input_shapes=shapes)
        checks = [
            _compare(o, "edge", reference[o], edge_out[o], self.tol) for o in self.plan.edge_outputs
        ]
        checks += [
            _compare(o, "cloud", reference[o], cloud_out[o], self.tol)
            for o in self.plan.cloud_outputs
        ]
        passed = all(c.passed for c in checks)
        return ProofCase(name, "passed" if passed else "failed", tuple(checks), input_shapes=shapes)

    def random_case(self, specs: Sequence[TensorSpec], seed: int, *, have_given: bool) -> ProofCase:
        errors: list[str] = []
        dynamic = any(s.shape and any(not isinstance(d, int) for d in s.shape) for s in specs)
        for size in _DYNAMIC_SIZES:
            feeds = random_inputs(specs, seed=seed, dynamic_size=size)
            try:
                what = f"at dynamic size {size}" if dynamic else "at its fixed shapes"
                with onnxruntime_errors(into=SplitError, what=what):
                    run_session(self.original, feeds)
            except SplitError as exc:
                errors.append(str(exc))
                if not dynamic:
                    break  # no dynamic axes: another size changes nothing
                continue
            return self.case("random", feeds)
        detail = f"the original model rejects random inputs: {errors[-1]}"
        if have_given:
            return ProofCase("random", "skipped", detail=detail)
        return ProofCase("random", "failed", detail=detail + "; give sample inputs")


def split_model(
    model: Path,
    cut: Sequence[str],
    out_dir: Path,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> SplitReport:
    """Cut ``model`` at the tensors named in ``cut``; write ``edge.onnx``, ``cloud.onnx`` and
    ``split.json`` to ``out_dir``; prove the cut.

    The proof runs the original model and edge → cloud on random inputs (dynamic axes
    get small sizes, integer inputs 0/1, mask inputs ones) and on ``inputs`` when given (one
    batch, keyed by input name), and checks every original output within ``rtol``/``atol``
    (``|split − original| ≤ atol + rtol·|original|``; integer outputs must match exactly).
    A failed proof does not raise: the report says so (``report.passed``).

    Raises :class:`ModelError` for an unreadable model, an unknown tensor name or sample
    inputs that do not fit the model, and :class:`SplitError` for a cut that separates
    nothing or parts that cannot be built.
    """
    if isinstance(cut, str):
        cut = [cut]
    names = list(dict.fromkeys(cut))
    if not names:
        raise ValueError("cut must name at least one tensor")
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError("cut must be a sequence of tensor names")
    if rtol < 0 or atol < 0:
        raise ValueError("rtol and atol must not be negative")
    model_path = Path(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a directory")

    original = load_model(model_path)
    specs = input_specs(original)
    given = validate_feeds(specs, inputs, "sample input") if inputs is not None else None
    plan = _plan(original, names, model_path)

    with onnxruntime_errors(into=SplitError, what="onnxruntime cannot load the model or a part"):
        prover = _Prover(
            make_session(original),
            make_session(plan.edge),
            make_session(plan.cloud),
            plan,
            _Tolerance(rtol, atol),
        )

    cases = [prover.random_case(specs, seed, have_given=given is not None)]
    if given is not None:
        with onnxruntime_errors(into=ModelError, what="the model rejects the sample inputs"):
            cases.append(prover.case("given", given))

    out.mkdir(parents=True, exist_ok=True)
    edge_path, cloud_path = out / EDGE_FILE, out / CLOUD_FILE
    onnx.save(plan.edge, str(edge_path))
    onnx.save(plan.cloud, str(cloud_path))
    report = SplitReport(
        model=model_path,
        edge_model=edge_path,
        cloud_model=cloud_path,
        requested_cut=tuple(names),
        boundary=plan.boundary,
        edge_outputs=plan.edge_outputs,
        cloud_outputs=plan.cloud_outputs,
        edge_nodes=len(plan.edge.graph.node),
        cloud_nodes=len(plan.cloud.graph.node),
        rtol=rtol,
        atol=atol,
        cases=tuple(cases),
    )
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
