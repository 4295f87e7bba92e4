"""The reference cloud model: a deterministic MLP for benchmarks and tests.

``256 → 2048 → 1024 → 10`` (ReLU between layers, about 2.6 million FP32 parameters, a
dynamic batch axis) with weights drawn from a seeded generator, so the same seed writes the
same bytes on every machine. It is large enough that a batch of 16 costs much less than 16
batches of one, which is what dynamic batching exploits, and small enough to load in a
fraction of a second. Needs ``onnx`` (the ``tools`` extra) to build.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "REFERENCE_MLP_INPUT",
    "REFERENCE_MLP_NAME",
    "REFERENCE_MLP_OUTPUT",
    "build_reference_mlp",
    "reference_mlp_forward",
    "reference_mlp_weights",
    "write_reference_mlp",
]

REFERENCE_MLP_NAME = "mlp"
REFERENCE_MLP_INPUT = "input"
REFERENCE_MLP_OUTPUT = "logits"
_LAYERS = (256, 2048, 1024, 10)


def reference_mlp_weights(
    layers: Sequence[int] = _LAYERS, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(weight [in, out], bias [out])`` per layer, He-initialised from ``seed``."""
    if len(layers) < 2 or any(n < 1 for n in layers):
        raise ValueError(f"layers must be at least two positive sizes, got {list(layers)}")
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in itertools.pairwise(layers):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        weights.append((w, b))
    return weights


def reference_mlp_forward(
    x: np.ndarray, layers: Sequence[int] = _LAYERS, seed: int = 0
) -> np.ndarray:
    """The model's answer computed with numpy, to check a served copy against."""
    h = np.asarray(x, dtype=np.float32)
    weights = reference_mlp_weights(layers, seed)
    for i, (w, b) in enumerate(weights):
        h = h @ w + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h


def build_reference_mlp(layers: Sequence[int] = _LAYERS, seed: int = 0) -> bytes:
    """The serialized ONNX model: input ``input`` FP32 ``[batch, layers[0]]``, output
    ``logits`` FP32 ``[batch, layers[-1]]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = reference_mlp_weights(layers, seed)
    nodes = []
    initializers = []
    h = REFERENCE_MLP_INPUT
    for i, (w, b) in enumerate(weights):
        last = i == len(weights) - 1
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]))
        out = REFERENCE_MLP_OUTPUT if last else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            h = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "fogline_reference_mlp",
        [
            helper.make_tensor_value_info(
                REFERENCE_MLP_INPUT, TensorProto.FLOAT, ["batch", layers[0]]
            )
        ],
        [
            helper.make_tensor_value_info(
                REFERENCE_MLP_OUTPUT, TensorProto.FLOAT, ["batch", layers[-1]]
            )
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fogline"
    )
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def write_reference_mlp(
    repository: str | Path,
    *,
    name: str = REFERENCE_MLP_NAME,
    version: int = 1,
    seed: int = 0,
    layers: Sequence[int] = _LAYERS,
    config_toml: str | None = None,
) -> Path:
    """Write the model into a Triton-layout repository as ``<repository>/<name>/<version>/
    model.onnx`` (and ``<name>/config.toml`` when ``config_toml`` is given, e.g.
    ``"max_batch_size = 0"`` for a copy that does not batch); returns the model file."""
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"name {name!r} cannot be a model folder")
    folder = Path(repository) / name
    path = folder / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_reference_mlp(layers, seed))
    if config_toml is not None:
        (folder / "config.toml").write_text(config_toml, encoding="utf-8")
    return path
