"""The committed reference bundle keeps its promises, and a fresh build makes a working bundle.

The figures are recomputed here from the bundle's models with onnxruntime on the same
held-out frames the manifest names, not read back from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fogline.compression import Codec, Envelope, Kind, decode_envelope, encode_envelope
from fogline.compression._cpu import u8s8_saturates
from fogline.reference import BUNDLE_DIR
from fogline.reference._frames import FRAME_SHAPE, NO_DIGIT, make_frames
from fogline.sync import Bundle

# recorded figures are reproduced to within this many points (onnxruntime may sum in
# another order on another thread count; the codec is not applied here)
REPRODUCE_POINTS = 0.1
MAX_DELTA_POINTS = 0.5


# Without VNNI, onnxruntime's u8s8 kernels multiply with VPMADDUBSW, whose pair sums
# saturate at 16 bits (onnxruntime documents it under quantization, "saturation"): the
# INT8 edge then decides a few frames differently. Measured on an AVX2-only AMD EPYC:
# relevance accuracy 99.62 against the 99.84 recorded on an AVX-512 VNNI host. There the
# recorded INT8 figures are held to the INT8-vs-FP32 bound instead.
INT8_REPRODUCE_POINTS = MAX_DELTA_POINTS if u8s8_saturates() else REPRODUCE_POINTS


def _run(path: Path, inputs: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for start in range(0, len(inputs), batch):
        for o, value in zip(
            outputs, session.run(outputs, {name: inputs[start : start + batch]}), strict=True
        ):
            parts[o].append(value)
    return {o: np.concatenate(chunks) for o, chunks in parts.items()}


def _points(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(predictions == labels))


@dataclass(frozen=True)
class Figures:
    relevance_accuracy: float
    edge_only_accuracy: float
    hybrid_accuracy: float
    exit_head_accuracy_on_digits: float


def _figures(bundle: Bundle, edge_model: Path, frames: np.ndarray, labels: np.ndarray) -> Figures:
    """The pipeline's decisions, computed from scratch: drop, answer at the edge, or forward."""
    out = _run(edge_model, frames)
    relevance = out[bundle.edge.filter_output or ""].reshape(-1)
    exit_probs = out[bundle.edge.exit_output or ""]
    keep = relevance >= bundle.thresholds.relevance
    exits = keep & (exit_probs.max(axis=1) >= bundle.thresholds.exit_confidence)
    forwarded = keep & ~exits
    answer = np.full(len(labels), NO_DIGIT, dtype=np.int64)
    answer[exits] = exit_probs[exits].argmax(axis=1)
    if forwarded.any():
        cloud = _run(bundle.cloud_model_path, out["features"][forwarded])[bundle.cloud.output]
        answer[forwarded] = cloud.argmax(axis=1)
    is_digit = labels != NO_DIGIT
    return Figures(
        relevance_accuracy=_points(keep, is_digit),
        edge_only_accuracy=_points(np.where(keep, exit_probs.argmax(axis=1), NO_DIGIT), labels),
        hybrid_accuracy=_points(answer, labels),
        exit_head_accuracy_on_digits=_points(exit_probs[is_digit].argmax(axis=1), labels[is_digit]),
    )


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(BUNDLE_DIR)


@pytest.fixture(scope="module")
def holdout(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    spec = bundle.manifest["metrics"]["eval"]
    assert spec["split"] == "holdout"
    return make_frames(spec["frames"], seed=spec["seed"], p_digit=spec["p_digit"], split="holdout")


@pytest.fixture(scope="module")
def int8(bundle: Bundle, holdout: tuple[np.ndarray, np.ndarray]) -> Figures:
    return _figures(bundle, bundle.edge_model_path, *holdout)


@pytest.fixture(scope="module")
def fp32(bundle: Bundle, holdout: tuple[np.ndarray, np.ndarray]) -> Figures:
    return _figures(bundle, bundle.path(bundle.manifest["extra_models"]["edge_fp32"]), *holdout)


def test_the_committed_bundle_loads_with_verified_hashes_and_complete_parts(
    bundle: Bundle,
) -> None:
    assert bundle.id == "reference@1"
    assert set(bundle.manifest["files"]) == {
        "edge.onnx",
        "edge_fp32.onnx",
        "cloud.onnx",
        "full.onnx",
    }
    assert bundle.edge.input == "frame"
    assert bundle.edge.filter_output == "relevance"
    assert bundle.edge.exit_output == "exit_probs"
    assert bundle.edge.feature_outputs == ("features",)
    assert bundle.cloud.output == "probs"
    assert bundle.codec == "int8"
    assert bundle.labels == tuple(str(d) for d in range(10))
    for name in bundle.manifest["extra_models"].values():
        assert bundle.path(name).is_file()
    total = sum(info["bytes"] for info in bundle.manifest["files"].values())
    assert total < 4 * 1024 * 1024


def test_the_models_take_raw_frames_and_hand_features_to_the_cloud(bundle: Bundle) -> None:
    frames, _ = make_frames(5, seed=123)
    out = _run(bundle.edge_model_path, frames)
    assert out["relevance"].shape == (5, 1)
    assert out["exit_probs"].shape == (5, 10)
    features = out["features"]
    assert features.ndim == 2
    assert features.shape[0] == 5
    assert 32 <= features.shape[1] <= 64
    probs = _run(bundle.cloud_model_path, features)["probs"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    full = _run(bundle.path(bundle.manifest["extra_models"]["full"]), frames)
    assert full["probs"].shape == (5, 10)
    assert np.all((full["relevance"] >= 0) & (full["relevance"] <= 1))
    session = ort.InferenceSession(str(bundle.edge_model_path))
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert tuple(session.get_inputs()[0].shape[1:]) == FRAME_SHAPE


def test_the_int8_edge_reproduces_the_recorded_accuracy(bundle: Bundle, int8: Figures) -> None:
    recorded = bundle.manifest["metrics"]["edge_int8"]
    tolerance = INT8_REPRODUCE_POINTS
    assert int8.relevance_accuracy == pytest.approx(recorded["relevance_accuracy"], abs=tolerance)
    assert int8.edge_only_accuracy == pytest.approx(recorded["edge_only_accuracy"], abs=tolerance)
    assert int8.exit_head_accuracy_on_digits == pytest.approx(
        recorded["exit_head_accuracy_on_digits"], abs=tolerance
    )
    assert int8.hybrid_accuracy == pytest.approx(recorded["hybrid_accuracy"], abs=tolerance)


def test_the_int8_edge_is_within_half_a_point_of_fp32(int8: Figures, fp32: Figures) -> None:
    for field in (
        "relevance_accuracy",
        "edge_only_accuracy",
        "hybrid_accuracy",
        "exit_head_accuracy_on_digits",
    ):
        delta = getattr(fp32, field) - getattr(int8, field)
        assert delta <= MAX_DELTA_POINTS, f"{field}: INT8 trails FP32 by {delta:.2f} points"


def test_the_hybrid_is_within_half_a_point_of_the_cloud_only_model(
    bundle: Bundle, holdout: tuple[np.ndarray, np.ndarray], int8: Figures
) -> None:
    frames, labels = holdout
    out = _run(bundle.path(bundle.manifest["extra_models"]["full"]), frames)
    keep = out["relevance"].reshape(-1) >= bundle.thresholds.relevance
    cloud_only = _points(np.where(keep, out["probs"].argmax(axis=1), NO_DIGIT), labels)
    recorded = bundle.manifest["metrics"]["cloud_only_fp32"]["accuracy"]
    assert cloud_only == pytest.approx(recorded, abs=REPRODUCE_POINTS)
    assert cloud_only - int8.hybrid_accuracy <= MAX_DELTA_POINTS


def test_a_forwarded_feature_message_costs_about_a_hundred_bytes(bundle: Bundle) -> None:
    frames, _ = make_frames(20, seed=9, p_digit=1.0)
    features = _run(bundle.edge_model_path, frames)["features"]
    sizes = []
    for i, row in enumerate(features):
        message = encode_envelope(
            Envelope(
                kind=Kind.FEATURES,
                message_id=i.to_bytes(16, "big"),
                site="site-1",
                bundle=bundle.id,
                tensors={"features": row[None, :]},
                codec=Codec.parse(bundle.codec),
            ),
            zstd_level=bundle.zstd_level,
        )
        decoded = decode_envelope(message).tensors["features"][0]
        cosine = np.dot(decoded, row) / (np.linalg.norm(decoded) * np.linalg.norm(row))
        assert cosine > 0.999
        sizes.append(len(message))
    # 1 % of a raw 64×64 frame is 41 bytes a frame; most frames are never forwarded
    assert max(sizes) <= 160


@pytest.mark.slow
def test_a_quick_build_writes_a_bundle_that_loads_and_runs(tmp_path: Path) -> None:
    from fogline.reference._build import build_reference

    messages: list[str] = []
    out = tmp_path / "bundle"
    summary: dict[str, Any] = build_reference(out, seed=1, quick=True, progress=messages.append)
    bundle = Bundle.load(out)
    assert bundle.id == "reference@1"
    assert summary["thresholds"] == {
        "relevance": bundle.thresholds.relevance,
        "exit_confidence": bundle.thresholds.exit_confidence,
    }
    assert bundle.manifest["build"]["quick"] is True
    assert bundle.manifest["quantization"]["strategy"]
    assert any("epoch" in m for m in messages)
    frames, _ = make_frames(8, seed=1)
    out_edge = _run(bundle.edge_model_path, frames)
    assert out_edge["exit_probs"].shape == (8, 10)
    probs = _run(bundle.cloud_model_path, out_edge["features"])["probs"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)


def test_the_exported_edge_computes_what_the_trained_edge_computes() -> None:
    """The first convolution, regrouped over 2×2 blocks with the pixel scale in its
    weights, gives the trained network's outputs on any frame, borders included."""
    import torch

    from fogline.reference._build import _DeployedEdge, _Edge

    torch.manual_seed(3)
    edge = _Edge()
    for module in edge.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics as if trained
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    edge.eval()
    deployed = _DeployedEdge(edge).eval()
    frames = torch.randint(0, 256, (6, *FRAME_SHAPE), dtype=torch.uint8)
    frames[0] = 255  # every border tap carries weight
    with torch.no_grad():
        for want, got in zip(edge(frames), deployed(frames), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_committed_int8_edge_reads_the_frame_without_a_cast(bundle: Bundle) -> None:
    import onnx

    graph = onnx.load(str(bundle.edge_model_path)).graph
    readers = [n.op_type for n in graph.node if "frame" in n.input]
    assert readers == ["SpaceToDepth"]
    assert "Cast" not in {n.op_type for n in graph.node}
