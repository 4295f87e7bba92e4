"""Build the reference bundle: a digit-spotting model split into an INT8 edge and a cloud tail.

The model reads raw camera-like frames (:mod:`fogline.reference._frames`, uint8 ``[N, 1, 64, 64]``)
through a shared convolutional backbone with three edge heads:

- ``relevance``: probability that a digit is in the frame (the filter: drop below threshold),
- ``features``: a 32-float vector, the only thing that crosses the cut to the cloud,
- ``exit_probs``: a linear classifier on the features whose top probability is the
  confidence used for answering at the edge,

and a heavier cloud tail (an MLP, ``features`` → ``probs``) that is more accurate than the
exit head. Backbone, relevance head, features and cloud tail are trained together with
torch; the exit head learns alongside from the features without shaping them. Training
uses the training split's digits less a fifth kept for validation; the models are
exported to ONNX, the edge part is quantized to INT8 by
:func:`fogline.compression._quantize.quantize_model`, the exit threshold is chosen on
validation frames, and the bundle is measured on frames of held-out digits (never
trained on). The figures go into the manifest so that anyone can check them; every frame is
routed by the agent's own decision rule (:func:`fogline.edge_agent.decide_batch`), so the
figures say what an agent running the bundle does, NaN and infinite head values included.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from torch import nn
from torch.nn import functional

from fogline.compression import Codec, Envelope, Kind, decode_envelope, encode_envelope
from fogline.edge_agent import Decision, decide_batch
from fogline.reference._frames import (
    FRAME_SHAPE,
    NO_DIGIT,
    digit_pool,
    frames_from_digits,
    make_frames,
)
from fogline.sync import Thresholds, write_manifest

__all__ = ["build_reference", "decide", "routes"]

BUNDLE_NAME = "reference"
BUNDLE_VERSION = "1"
LABELS = tuple(str(d) for d in range(10))
FEATURE_DIM = 32
OPSET = 17
RELEVANCE_THRESHOLD = 0.5
# the hybrid may trail the cloud-only model by this much on validation frames
EXIT_TOLERANCE_POINTS = 0.3
# the exit head answers only when one class holds most of the probability mass
EXIT_THRESHOLD_FLOOR = 0.5
ZSTD_LEVEL = 3
VALIDATION_EVERY = 5
TORCH_THREADS = 2
SPEED_BATCH = 32

EDGE_FILE = "edge.onnx"
EDGE_FP32_FILE = "edge_fp32.onnx"
CLOUD_FILE = "cloud.onnx"
FULL_FILE = "full.onnx"
MODEL_FILES = (EDGE_FILE, EDGE_FP32_FILE, CLOUD_FILE, FULL_FILE)

# decision routes: the agent's own codes
DROPPED, EXITED, FORWARDED = int(Decision.DROP), int(Decision.EXIT), int(Decision.FORWARD)

# purposes for deriving independent frame streams from one seed
_TRAIN_STREAM, _VALIDATION_STREAM, _CALIBRATION_STREAM, _EVAL_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class _Settings:
    """Sizes and hyper-parameters of one build (recorded in the manifest)."""

    epochs: int
    train_frames_per_epoch: int
    train_p_digit: float
    batch_size: int
    learning_rate: float
    weight_decay: float
    exit_loss_weight: float
    validation_frames: int
    calibration_frames: int
    eval_frames: int
    eval_p_digit: float = 0.2
    validation_p_digit: float = 0.2


_FULL = _Settings(
    epochs=6,
    train_frames_per_epoch=8_000,
    train_p_digit=0.5,
    batch_size=128,
    learning_rate=4e-3,
    weight_decay=1e-4,
    exit_loss_weight=0.5,
    validation_frames=5_000,
    calibration_frames=512,
    eval_frames=5_000,
)
_QUICK = _Settings(
    epochs=2,
    train_frames_per_epoch=2_000,
    train_p_digit=0.5,
    batch_size=128,
    learning_rate=4e-3,
    weight_decay=1e-4,
    exit_loss_weight=0.5,
    validation_frames=1_000,
    calibration_frames=128,
    eval_frames=1_000,
)


_Digits = tuple[np.ndarray, np.ndarray]


def _split_training_digits() -> tuple[_Digits, _Digits]:
    """The training split's digits, less every fifth image of each class kept for validation.

    The exit threshold is chosen on frames of digits the model has not been trained on, so
    that the choice carries over to the held-out digits (those are only for measuring).
    """
    images, labels = digit_pool("train")
    validation = np.zeros(len(labels), dtype=bool)
    for cls in range(10):
        validation[np.flatnonzero(labels == cls)[::VALIDATION_EVERY]] = True
    return (images[~validation], labels[~validation]), (images[validation], labels[validation])


def _stream_seed(seed: int, purpose: int, index: int = 0) -> int:
    """An independent, stable 32-bit seed for one frame stream of a build."""
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1)[0])


# ---------------------------------------------------------------------------- model


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class _Edge(nn.Module):
    """Backbone and the three edge heads; returns logits while training."""

    def __init__(self) -> None:
        super().__init__()
        # Convolutions dominate the cost (about 48 M multiply-adds a frame), which is
        # what INT8 speeds up; the channel counts are multiples of 16 for the int8 kernels.
        self.backbone = nn.Sequential(
            *_conv(1, 32, kernel=5, stride=2),  # 32×32
            *_conv(32, 48),
            nn.MaxPool2d(2),  # 16×16
            *_conv(48, 96),
            *_conv(96, 96),
            # global max pooling finds a small digit anywhere in the frame much sooner
            # in training than average pooling, which dilutes it with background
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.relevance = nn.Linear(96, 1)
        self.features = nn.Linear(96, FEATURE_DIM)
        self.exit = nn.Linear(FEATURE_DIM, 10)

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.backbone(frame.float() * (1.0 / 255.0)))

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.features(hidden)
        return self.relevance(hidden), features, self.exit(features)


class _SpaceToDepth(torch.autograd.Function):
    """Each 2×2 block of a one-channel frame as four channels; exported as ONNX
    ``SpaceToDepth``, which for one channel orders the block's pixels as
    :func:`torch.nn.functional.pixel_unshuffle` does (row by row)."""

    @staticmethod
    def forward(ctx: Any, frame: torch.Tensor) -> torch.Tensor:
        return functional.pixel_unshuffle(frame, 2)

    @staticmethod
    def symbolic(g: Any, frame: Any) -> Any:
        return g.op("SpaceToDepth", frame, blocksize_i=2)


class _DeployedEdge(nn.Module):
    """The trained edge network, its first layer rewritten for the INT8 kernels.

    The first convolution (one input channel, 5×5, stride 2) is onnxruntime's slowest
    INT8 layer per multiply-add: with one channel, gathering its input windows moves one
    byte at a time. Computed instead as a 3×3 convolution over the frame's 2×2 blocks
    (four channels, stride 1), it gives the same sums: output pixel ``y`` reads rows
    ``2y-2 … 2y+2``, which are rows 0–1 of block ``y-1``, rows 0–1 of block ``y`` and row 0 of
    block ``y+1``; the taps for row 1 of block ``y+1`` (and likewise for columns) are zero.
    The pixel scale 1/255 moves into the weights, so the graph reads the uint8 frame, regroups
    it as uint8, and casts once: an INT8 build quantizes that cast losslessly (scale 1),
    with nothing between the frame and the first INT8 convolution.
    """

    def __init__(self, edge: _Edge) -> None:
        super().__init__()
        conv = edge.backbone[0]
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.in_channels == 1
            and conv.kernel_size == (5, 5)
            and conv.stride == (2, 2)
            and conv.padding == (2, 2)
            and conv.bias is None
        ):
            raise TypeError("the edge backbone must start with a 1-channel 5×5 stride-2 conv")
        self.edge = edge
        self.stem = nn.Conv2d(4, conv.out_channels, 3, padding=1, bias=False)
        w5 = conv.weight.detach()[:, 0] * (1.0 / 255.0)  # [out, 5, 5]
        w3 = torch.zeros_like(self.stem.weight)  # [out, 4, 3, 3]
        for a in range(2):  # row within a block
            for b in range(2):  # column within a block
                for ky in range(3):  # block row offset -1, 0, +1
                    for kx in range(3):
                        dy, dx = 2 * (ky - 1) + a, 2 * (kx - 1) + b  # frame offset
                        if -2 <= dy <= 2 and -2 <= dx <= 2:
                            w3[:, 2 * a + b, ky, kx] = w5[:, dy + 2, dx + 2]
        with torch.no_grad():
            self.stem.weight.copy_(w3)
        self.rest = edge.backbone[1:]

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks = _SpaceToDepth.apply(frame).float()  # type: ignore[no-untyped-call]
        return self.edge.heads(self.rest(self.stem(blocks)))


class _Cloud(nn.Module):
    """The cloud tail: an MLP on the features; returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FEATURE_DIM, 384),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(384, 384),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(384, 10),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(features)
        return out


class _EdgeGraph(nn.Module):
    """What ``edge_fp32.onnx`` computes: frame → relevance, features, exit_probs."""

    def __init__(self, edge: _Edge | _DeployedEdge) -> None:
        super().__init__()
        self.edge = edge

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        relevance, features, exit_logits = self.edge(frame)
        return torch.sigmoid(relevance), features, torch.softmax(exit_logits, dim=1)


class _CloudGraph(nn.Module):
    """What ``cloud.onnx`` computes: features → probs."""

    def __init__(self, cloud: _Cloud) -> None:
        super().__init__()
        self.cloud = cloud

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.cloud(features), dim=1)


class _FullGraph(nn.Module):
    """What ``full.onnx`` computes: frame → relevance, probs (the cloud-only baseline)."""

    def __init__(self, edge: _Edge | _DeployedEdge, cloud: _Cloud) -> None:
        super().__init__()
        self.edge = edge
        self.cloud = cloud

    def forward(self, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        relevance, features, _ = self.edge(frame)
        return torch.sigmoid(relevance), torch.softmax(self.cloud(features), dim=1)


# ---------------------------------------------------------------------------- training


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch, fix its thread count and ask for deterministic kernels; restore after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(TORCH_THREADS)
        torch.use_deterministic_algorithms(True)
        # filling every new tensor with NaN (the default in deterministic mode) costs
        # time and only matters for kernels that read memory they did not write
        fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _train(
    settings: _Settings, seed: int, progress: Callable[[str], None]
) -> tuple[_Edge, _Cloud, list[dict[str, float]]]:
    edge, cloud = _Edge(), _Cloud()
    params = [*edge.parameters(), *cloud.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    steps_per_epoch = -(-settings.train_frames_per_epoch // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=settings.learning_rate,
        total_steps=settings.epochs * steps_per_epoch,
        pct_start=0.2,
    )
    (train_images, train_labels), _ = _split_training_digits()
    order = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    edge.train()
    cloud.train()
    for epoch in range(settings.epochs):
        # fresh placements, sizes, backgrounds and clutter every epoch
        frames, labels = frames_from_digits(
            settings.train_frames_per_epoch,
            seed=_stream_seed(seed, _TRAIN_STREAM, epoch),
            images=train_images,
            labels=train_labels,
            p_digit=settings.train_p_digit,
        )
        x_all, y_all = torch.from_numpy(frames), torch.from_numpy(labels)
        perm = torch.randperm(len(y_all), generator=order)
        totals = {"loss": 0.0, "relevance_acc": 0.0, "exit_acc": 0.0, "cloud_acc": 0.0}
        seen = digits_seen = 0
        for start in range(0, len(perm), settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            x, y = x_all[idx], y_all[idx]
            is_digit = y != NO_DIGIT
            rel_logit, features, _ = edge(x)
            # the exit head is a linear read-out of features shaped by the cloud tail
            exit_logits = edge.exit(features.detach())
            loss = functional.binary_cross_entropy_with_logits(
                rel_logit.squeeze(1), is_digit.float()
            )
            if bool(is_digit.any()):
                cloud_logits = cloud(features[is_digit])
                target = y[is_digit]
                loss = (
                    loss
                    + functional.cross_entropy(cloud_logits, target)
                    + settings.exit_loss_weight
                    * functional.cross_entropy(exit_logits[is_digit], target)
                )
                with torch.no_grad():
                    totals["cloud_acc"] += float((cloud_logits.argmax(1) == target).sum())
                    totals["exit_acc"] += float((exit_logits[is_digit].argmax(1) == target).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                totals["loss"] += float(loss) * len(y)
                totals["relevance_acc"] += float(((rel_logit.squeeze(1) > 0) == is_digit).sum())
            seen += len(y)
            digits_seen += int(is_digit.sum())
        stats = {
            "epoch": float(epoch + 1),
            "loss": totals["loss"] / seen,
            "relevance_acc": 100.0 * totals["relevance_acc"] / seen,
            "exit_acc": 100.0 * totals["exit_acc"] / max(digits_seen, 1),
            "cloud_acc": 100.0 * totals["cloud_acc"] / max(digits_seen, 1),
        }
        history.append({k: round(v, 4) for k, v in stats.items()})
        progress(
            f"epoch {epoch + 1}/{settings.epochs}: loss {stats['loss']:.4f}, "
            f"relevance {stats['relevance_acc']:.2f} %, exit {stats['exit_acc']:.2f} %, "
            f"cloud {stats['cloud_acc']:.2f} % (training frames)"
        )
    edge.eval()
    cloud.eval()
    return edge, cloud, history


# ---------------------------------------------------------------------------- export


def _export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
) -> None:
    dynamic = {name: {0: "batch"} for name in (input_name, *output_names)}
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated but gives exactly the opset asked for
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _export_all(edge: _Edge, cloud: _Cloud, out: Path) -> None:
    frame = torch.zeros((2, *FRAME_SHAPE), dtype=torch.uint8)
    features = torch.zeros((2, FEATURE_DIM), dtype=torch.float32)
    with torch.no_grad():
        deployed = _DeployedEdge(edge).eval()
        _export(
            _EdgeGraph(deployed),
            frame,
            out / EDGE_FP32_FILE,
            "frame",
            ["relevance", "features", "exit_probs"],
        )
        _export(_CloudGraph(cloud), features, out / CLOUD_FILE, "features", ["probs"])
        _export(
            _FullGraph(deployed, cloud), frame, out / FULL_FILE, "frame", ["relevance", "probs"]
        )


# ---------------------------------------------------------------------------- decisions


def routes(
    relevance: np.ndarray,
    exit_probs: np.ndarray | None,
    *,
    relevance_threshold: float,
    exit_threshold: float,
) -> np.ndarray:
    """Where each frame goes (``DROPPED``/``EXITED``/``FORWARDED``), decided by the agent's
    own rule (:func:`fogline.edge_agent.decide_batch`) so that the build measures exactly
    what a running agent does: below ``relevance_threshold`` a frame is dropped, at or above
    ``exit_threshold`` of the exit head's top probability it is answered at the edge, and a
    NaN from either head sends it to the cloud. ``exit_probs`` ``None``: no exit head.
    """
    rel = np.asarray(relevance, dtype=np.float32).reshape(-1)
    outputs = {"relevance": rel}
    if exit_probs is not None:
        outputs["exit_probs"] = np.asarray(exit_probs, dtype=np.float32)
    batch = decide_batch(
        outputs,
        thresholds=Thresholds(relevance=relevance_threshold, exit_confidence=exit_threshold),
        filter_output="relevance",
        exit_output=None if exit_probs is None else "exit_probs",
        batch_size=len(rel),
    )
    return batch.decisions.astype(np.int64)


def decide(
    relevance: np.ndarray,
    exit_probs: np.ndarray,
    cloud_probs: np.ndarray,
    *,
    relevance_threshold: float,
    exit_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """What the hybrid answers for each frame, and where the answer comes from.

    Routes come from :func:`routes` (the agent's rule); a dropped frame answers
    :data:`~fogline.reference._frames.NO_DIGIT`, an exited one the exit head's top class, a
    forwarded one the cloud tail's. Returns ``(predictions, routes)``.
    """
    where = routes(
        relevance,
        exit_probs,
        relevance_threshold=relevance_threshold,
        exit_threshold=exit_threshold,
    )
    predictions = np.where(
        where == EXITED, np.argmax(exit_probs, axis=1), np.argmax(cloud_probs, axis=1)
    )
    predictions = np.where(where == DROPPED, NO_DIGIT, predictions).astype(np.int64)
    return predictions, where


def _accuracy_points(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of frames answered right, in percent (``NO_DIGIT`` is right for empty frames)."""
    return float(100.0 * np.mean(predictions == labels)) if len(labels) else 0.0


def _choose_exit_threshold(
    relevance: np.ndarray,
    exit_probs: np.ndarray,
    cloud_probs: np.ndarray,
    labels: np.ndarray,
    *,
    relevance_threshold: float,
    target_points: float,
) -> float:
    """The lowest exit threshold at which the hybrid reaches ``target_points`` and stays there.

    Lower thresholds let more frames exit at the edge; every higher candidate must also
    meet the target, so that the choice does not rest on one lucky dip. Candidates are the
    observed confidences (rounded to 4 decimals) between ``EXIT_THRESHOLD_FLOOR`` and 1.
    """
    conf = np.max(exit_probs, axis=1)
    candidates = np.unique(np.concatenate([np.round(conf, 4), [EXIT_THRESHOLD_FLOOR, 1.0]]))
    candidates = candidates[(candidates >= EXIT_THRESHOLD_FLOOR) & (candidates <= 1.0)]
    chosen = 1.0
    for threshold in candidates[::-1]:
        preds, _ = decide(
            relevance,
            exit_probs,
            cloud_probs,
            relevance_threshold=relevance_threshold,
            exit_threshold=float(threshold),
        )
        if _accuracy_points(preds, labels) + 1e-9 < target_points:
            break
        chosen = float(threshold)
    return chosen


# ---------------------------------------------------------------------------- running


def _session(path: Path, threads: int = TORCH_THREADS) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, inputs: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Run a single-input model over ``inputs`` in batches; outputs by name."""
    session = _session(path)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(inputs), batch):
        outs = session.run(names, {input_name: inputs[start : start + batch]})
        for name, value in zip(names, outs, strict=True):
            parts[name].append(np.asarray(value))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _through_codec(features: np.ndarray, bundle_id: str) -> tuple[np.ndarray, list[int]]:
    """Send each feature row through the wire codec, as the agent does; sizes in bytes."""
    decoded = np.empty_like(features, dtype=np.float32)
    sizes: list[int] = []
    for i, row in enumerate(features):
        message = encode_envelope(
            Envelope(
                kind=Kind.FEATURES,
                message_id=i.to_bytes(16, "big"),
                site="site-1",
                bundle=bundle_id,
                tensors={"features": row[None, :]},
                codec=Codec.INT8,
                created_us=1,
                sent_us=1,
            ),
            zstd_level=ZSTD_LEVEL,
        )
        sizes.append(len(message))
        decoded[i] = decode_envelope(message).tensors["features"][0]
    return decoded, sizes


@dataclass(frozen=True)
class _EdgeRun:
    relevance: np.ndarray
    features: np.ndarray
    exit_probs: np.ndarray


def _run_edge(path: Path, frames: np.ndarray) -> _EdgeRun:
    out = _run(path, frames)
    return _EdgeRun(out["relevance"], out["features"], out["exit_probs"])


def _hybrid(
    edge: _EdgeRun,
    cloud_path: Path,
    labels: np.ndarray,
    *,
    exit_threshold: float,
    bundle_id: str,
) -> dict[str, Any]:
    """Hybrid figures for one edge model: the cloud tail sees codec-decoded features."""
    where = routes(
        edge.relevance,
        edge.exit_probs,
        relevance_threshold=RELEVANCE_THRESHOLD,
        exit_threshold=exit_threshold,
    )
    keep = where != DROPPED
    forwarded = where == FORWARDED
    cloud_probs = np.zeros((len(labels), 10), dtype=np.float32)
    sizes: list[int] = []
    if forwarded.any():
        decoded, sizes = _through_codec(edge.features[forwarded], bundle_id)
        cloud_probs[forwarded] = _run(cloud_path, decoded)["probs"]
    preds, _ = decide(
        edge.relevance,
        edge.exit_probs,
        cloud_probs,
        relevance_threshold=RELEVANCE_THRESHOLD,
        exit_threshold=exit_threshold,
    )
    is_digit = labels != NO_DIGIT
    edge_only = np.where(keep, np.argmax(edge.exit_probs, axis=1), NO_DIGIT)
    return {
        "relevance_accuracy": _accuracy_points(keep, is_digit),
        "exit_head_accuracy_on_digits": _accuracy_points(
            np.argmax(edge.exit_probs[is_digit], axis=1), labels[is_digit]
        ),
        "edge_only_accuracy": _accuracy_points(edge_only, labels),
        "hybrid_accuracy": _accuracy_points(preds, labels),
        "share_dropped": float(np.mean(where == DROPPED)),
        "share_exited": float(np.mean(where == EXITED)),
        "share_forwarded": float(np.mean(where == FORWARDED)),
        "forwarded_message_bytes_mean": float(np.mean(sizes)) if sizes else 0.0,
    }


def _cloud_only(full_path: Path, frames: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    out = _run(full_path, frames)
    # The cloud-only baseline keeps the agent's filter step and nothing else.
    where = routes(
        out["relevance"], None, relevance_threshold=RELEVANCE_THRESHOLD, exit_threshold=1.0
    )
    keep = where != DROPPED
    preds = np.where(keep, np.argmax(out["probs"], axis=1), NO_DIGIT)
    is_digit = labels != NO_DIGIT
    return {
        "accuracy": _accuracy_points(preds, labels),
        "relevance_accuracy": _accuracy_points(keep, is_digit),
        "tail_accuracy_on_digits": _accuracy_points(
            np.argmax(out["probs"][is_digit], axis=1), labels[is_digit]
        ),
    }


def _latency_ms(paths: list[Path], frames: np.ndarray, rounds: int = 20) -> list[float]:
    """Median time of one batch per model, single-threaded (the benchmark's setting).

    The models take turns, so that whatever else the machine does falls on all alike.
    """
    sessions = [_session(path, threads=1) for path in paths]
    feeds = [{s.get_inputs()[0].name: frames} for s in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for session, feed, record in zip(sessions, feeds, times, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            record.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(record) for record in times]


def _quantize(
    fp32: Path, calibration: np.ndarray, out: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    from fogline.compression._quantize import quantize_model

    # Agreement is measured on what decides where a frame goes and what crosses the cut:
    # the top class of ``exit_probs`` is arbitrary on empty frames, so its top-1 agreement
    # would measure noise; the accuracy deltas measured afterwards cover the exit head.
    report = quantize_model(
        fp32, {"frame": calibration}, out, outputs=["relevance", "features"], progress=progress
    )
    result: dict[str, Any] = report.to_dict()
    # the build's scratch paths mean nothing in the bundle: name the bundle's files
    result.update(model=fp32.name, output=out.name)
    return result


# ---------------------------------------------------------------------------- build


def _round_floats(obj: Any, digits: int = 4) -> Any:
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, Mapping):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round_floats(v, digits) for v in obj]
    return obj


def build_reference(
    out_dir: Path,
    *,
    seed: int = 0,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, export, quantize and measure the reference model; write the bundle to ``out_dir``.

    Deterministic for a given ``seed`` on a given CPU (fixed seeds, thread count and
    deterministic kernels). ``quick`` trains a smaller model run for tests; its accuracy is
    not meant to be used. Returns a summary (the manifest's metrics plus build facts).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")
    say = progress if progress is not None else (lambda _msg: None)
    settings = _QUICK if quick else _FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_id = f"{BUNDLE_NAME}@{BUNDLE_VERSION}"
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fogline-reference-") as tmp_name:
        work = Path(tmp_name)
        say(f"training ({settings.epochs} epochs of {settings.train_frames_per_epoch} frames)")
        with _deterministic_torch(seed):
            edge, cloud, history = _train(settings, seed, say)
            train_s = time.perf_counter() - started
            say("exporting ONNX models")
            _export_all(edge, cloud, work)

        say("quantizing the edge model to INT8")
        train_digits, (val_images, val_digit_labels) = _split_training_digits()
        calibration, _ = frames_from_digits(
            settings.calibration_frames,
            seed=_stream_seed(seed, _CALIBRATION_STREAM),
            images=train_digits[0],
            labels=train_digits[1],
            p_digit=0.5,
        )
        quant_report = _quantize(work / EDGE_FP32_FILE, calibration, work / EDGE_FILE, say)

        say("choosing the exit threshold on validation frames")
        val_seed = _stream_seed(seed, _VALIDATION_STREAM)
        val_frames, val_labels = frames_from_digits(
            settings.validation_frames,
            seed=val_seed,
            images=val_images,
            labels=val_digit_labels,
            p_digit=settings.validation_p_digit,
        )
        val_edge = _run_edge(work / EDGE_FILE, val_frames)
        val_cloud = _run(work / CLOUD_FILE, val_edge.features)["probs"]
        val_cloud_only = _cloud_only(work / FULL_FILE, val_frames, val_labels)
        # Rounded as the manifest records it, before any figure is measured: the agent
        # compares against the manifest's value, so the figures must too.
        exit_threshold = round(
            _choose_exit_threshold(
                val_edge.relevance,
                val_edge.exit_probs,
                val_cloud,
                val_labels,
                relevance_threshold=RELEVANCE_THRESHOLD,
                target_points=val_cloud_only["accuracy"] - EXIT_TOLERANCE_POINTS,
            ),
            4,
        )
        val_hybrid = _hybrid(
            val_edge,
            work / CLOUD_FILE,
            val_labels,
            exit_threshold=exit_threshold,
            bundle_id=bundle_id,
        )

        say("measuring on frames of held-out digits")
        eval_seed = _stream_seed(seed, _EVAL_STREAM)
        frames, labels = make_frames(
            settings.eval_frames, seed=eval_seed, p_digit=settings.eval_p_digit, split="holdout"
        )
        cloud_only = _cloud_only(work / FULL_FILE, frames, labels)
        int8 = _hybrid(
            _run_edge(work / EDGE_FILE, frames),
            work / CLOUD_FILE,
            labels,
            exit_threshold=exit_threshold,
            bundle_id=bundle_id,
        )
        fp32 = _hybrid(
            _run_edge(work / EDGE_FP32_FILE, frames),
            work / CLOUD_FILE,
            labels,
            exit_threshold=exit_threshold,
            bundle_id=bundle_id,
        )
        deltas = {
            key: fp32[key] - int8[key]
            for key in (
                "relevance_accuracy",
                "exit_head_accuracy_on_digits",
                "edge_only_accuracy",
                "hybrid_accuracy",
            )
        }
        speed_frames = frames[:SPEED_BATCH]
        fp32_ms, int8_ms = _latency_ms([work / EDGE_FP32_FILE, work / EDGE_FILE], speed_frames)
        sizes = {name: (work / name).stat().st_size for name in MODEL_FILES}

        metrics: dict[str, Any] = {
            "eval": {
                "split": "holdout",
                "seed": eval_seed,
                "frames": settings.eval_frames,
                "p_digit": settings.eval_p_digit,
                "digit_frames": int(np.sum(labels != NO_DIGIT)),
            },
            "cloud_only_fp32": cloud_only,
            "edge_int8": int8,
            "edge_fp32": fp32,
            "int8_accuracy_delta_points": deltas,
            "hybrid_vs_cloud_only_points": int8["hybrid_accuracy"] - cloud_only["accuracy"],
            "validation": {
                "split": "train",
                "digits": f"every {VALIDATION_EVERY}th image of each class, not trained on",
                "seed": val_seed,
                "frames": settings.validation_frames,
                "p_digit": settings.validation_p_digit,
                "cloud_only_accuracy": val_cloud_only["accuracy"],
                "hybrid_accuracy": val_hybrid["hybrid_accuracy"],
                "share_exited": val_hybrid["share_exited"],
                "tolerance_points": EXIT_TOLERANCE_POINTS,
            },
            "speed": {
                "batch": SPEED_BATCH,
                "threads": 1,
                "edge_fp32_ms": fp32_ms,
                "edge_int8_ms": int8_ms,
                "int8_vs_fp32_speedup": fp32_ms / int8_ms,
                "machine": platform.processor() or platform.machine(),
            },
            "model_bytes": sizes,
            "bundle_bytes": sum(sizes.values()),
        }
        build = {
            "seed": seed,
            "quick": quick,
            "settings": asdict(settings),
            "feature_dim": FEATURE_DIM,
            "opset": OPSET,
            "torch_threads": TORCH_THREADS,
            "parameters": {
                "edge": sum(p.numel() for p in edge.parameters()),
                "cloud": sum(p.numel() for p in cloud.parameters()),
            },
            "digit_images": {
                "train": len(train_digits[1]),
                "validation": len(val_digit_labels),
                "holdout": len(digit_pool("holdout")[1]),
            },
            "training_history": history,
            "train_s": train_s,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
            },
        }
        manifest: dict[str, Any] = {
            "name": BUNDLE_NAME,
            "version": BUNDLE_VERSION,
            "files": {name: {} for name in MODEL_FILES},
            "edge": {
                "model": EDGE_FILE,
                "input": "frame",
                "filter_output": "relevance",
                "exit_output": "exit_probs",
                "feature_outputs": ["features"],
            },
            "cloud": {"model": CLOUD_FILE, "output": "probs"},
            "thresholds": {
                "relevance": RELEVANCE_THRESHOLD,
                "exit_confidence": exit_threshold,
            },
            "codec": {"kind": "int8", "zstd_level": ZSTD_LEVEL},
            "labels": list(LABELS),
            "metrics": _round_floats(metrics),
            "build": _round_floats(build),
            "quantization": _round_floats(quant_report, 6),
            "extra_models": {"edge_fp32": EDGE_FP32_FILE, "full": FULL_FILE},
        }

        say(f"writing the bundle to {out_dir}")
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(work / name, out_dir / name)
        write_manifest(out_dir, manifest)

    elapsed = time.perf_counter() - started
    summary = {
        "out_dir": str(out_dir),
        "bundle": bundle_id,
        "elapsed_s": round(elapsed, 1),
        "thresholds": manifest["thresholds"],
        **manifest["metrics"],
    }
    say(f"done in {elapsed:.0f} s")
    return summary
