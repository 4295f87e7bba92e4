"""A reproducible stream of camera-like frames built from scikit-learn's handwritten digits.

Each frame is a 64×64 grayscale image: a smooth background (gradient plus low-frequency
texture), sensor noise, and clutter that is not a digit (bars, boxes, rings, thin lines,
blobs), so that telling "something is there" from "a digit is there" takes a model, not a
brightness test. Most frames hold no digit; a digit frame holds one digit from the 8×8
``load_digits`` set, upscaled to 20–36 px at a random place and contrast.

The digit images are split once and for all into a training subset and a held-out subset
(every fourth image of each class, in dataset order, is held out), so that a model trained
on ``split="train"`` is demonstrated and measured on digits it has never seen.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from sklearn.datasets import load_digits

__all__ = ["FRAME_SHAPE", "NO_DIGIT", "digit_pool", "frames_from_digits", "make_frames"]

FRAME_SHAPE: tuple[int, int, int] = (1, 64, 64)
"""Shape of one frame: one channel, 64×64 pixels (uint8)."""

NO_DIGIT = -1
"""Label of a frame without a digit."""

_SIDE = FRAME_SHAPE[1]
_HOLDOUT_EVERY = 4  # every fourth image of each class is held out (~25 %)
_DIGIT_SIZE_PX = (20, 36)
_DIGIT_CONTRAST = (70.0, 170.0)
_TEXTURE_GRID = 6
# how many clutter objects a frame carries: 0, 1, 2 or 3
_CLUTTER_COUNT_P = (0.2, 0.35, 0.3, 0.15)
_SPLIT_CODES = {"train": 0, "holdout": 1}
_CUSTOM_CODE = 2


@functools.cache
def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Bilinear resampling matrix (pixel-centre aligned): ``out = M @ img @ M.T``."""
    pos = (np.arange(out_size, dtype=np.float64) + 0.5) * in_size / out_size - 0.5
    pos = np.clip(pos, 0.0, in_size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    w = pos - lo
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), 1.0 - w)
    np.add.at(mat, (rows, hi), w)
    out = mat.astype(np.float32)
    out.setflags(write=False)
    return out


@functools.cache
def _digit_pool(split: Literal["train", "holdout"]) -> tuple[np.ndarray, np.ndarray]:
    """Digit images scaled to [0, 1] (float32 [M, 8, 8]) and their labels (int64 [M])."""
    digits = load_digits()
    target = np.asarray(digits.target, dtype=np.int64)
    holdout = np.zeros(len(target), dtype=bool)
    for cls in range(10):
        holdout[np.flatnonzero(target == cls)[::_HOLDOUT_EVERY]] = True
    mask = holdout if split == "holdout" else ~holdout
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0)[mask]
    labels = target[mask]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digit_pool(split: Literal["train", "holdout"]) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digit images (values in [0, 1]) and labels that ``split`` draws from."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'holdout', not {split!r}")
    return _digit_pool(split)


_YY, _XX = np.mgrid[0:_SIDE, 0:_SIDE].astype(np.float32) - (_SIDE - 1) / 2.0


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(30.0, 110.0)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    slope = rng.uniform(0.0, 60.0) / _SIDE
    grad = slope * (np.cos(theta) * _XX + np.sin(theta) * _YY)
    grid = rng.standard_normal((_TEXTURE_GRID, _TEXTURE_GRID)).astype(np.float32)
    grid *= rng.uniform(4.0, 20.0)
    up = _interp_matrix(_SIDE, _TEXTURE_GRID)
    texture = up @ grid @ up.T
    return np.asarray(base + grad + texture, dtype=np.float32)


def _overlaps(box: tuple[int, int, int, int], keep_out: tuple[int, int, int, int] | None) -> bool:
    if keep_out is None:
        return False
    y0, x0, y1, x1 = box
    k0, l0, k1, l1 = keep_out
    return y0 < k1 and k0 < y1 and x0 < l1 and l0 < x1


def _draw_clutter(
    frame: np.ndarray, rng: np.random.Generator, keep_out: tuple[int, int, int, int] | None
) -> None:
    """Add one non-digit object to ``frame`` in place, away from ``keep_out`` if given."""
    kind = int(rng.integers(5))
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(6, 30, size=2))
        y0 = int(rng.integers(-4, _SIDE - h + 4))
        x0 = int(rng.integers(-4, _SIDE - w + 4))
        if not _overlaps((y0, x0, y0 + h, x0 + w), keep_out):
            break
    else:
        return
    ys, xs = slice(max(y0, 0), min(y0 + h, _SIDE)), slice(max(x0, 0), min(x0 + w, _SIDE))
    yy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None] - (y0 + (h - 1) / 2.0)
    xx = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :] - (x0 + (w - 1) / 2.0)
    amplitude = rng.uniform(40.0, 150.0) * (1.0 if rng.random() < 0.6 else -1.0)
    if kind == 0:  # filled box or bar
        mask = np.ones((yy.shape[0], xx.shape[1]), dtype=np.float32)
    elif kind == 1:  # outlined box
        t = float(rng.integers(1, 3))
        inner = (np.abs(yy) < h / 2.0 - t) & (np.abs(xx) < w / 2.0 - t)
        mask = np.broadcast_to(~inner, inner.shape).astype(np.float32)
    elif kind == 2:  # filled ellipse or ring
        r = (yy / (h / 2.0)) ** 2 + (xx / (w / 2.0)) ** 2
        mask = (r <= 1.0).astype(np.float32)
        if rng.random() < 0.5:
            mask *= r >= rng.uniform(0.3, 0.6)
    elif kind == 3:  # thin straight line across the box
        angle = rng.uniform(0.0, np.pi)
        dist = np.abs(yy * np.cos(angle) - xx * np.sin(angle))
        mask = (dist <= rng.uniform(0.5, 1.2)).astype(np.float32)
    else:  # soft blob
        sy, sx = h / 4.0, w / 4.0
        mask = np.exp(-0.5 * ((yy / sy) ** 2 + (xx / sx) ** 2)).astype(np.float32)
    frame[ys, xs] += amplitude * mask


def _draw_digit(
    frame: np.ndarray, rng: np.random.Generator, image: np.ndarray
) -> tuple[int, int, int, int]:
    size = int(rng.integers(_DIGIT_SIZE_PX[0], _DIGIT_SIZE_PX[1] + 1))
    up = _interp_matrix(size, image.shape[0])
    patch = up @ image @ up.T
    y0 = int(rng.integers(0, _SIDE - size + 1))
    x0 = int(rng.integers(0, _SIDE - size + 1))
    frame[y0 : y0 + size, x0 : x0 + size] += rng.uniform(*_DIGIT_CONTRAST) * patch
    return y0, x0, y0 + size, x0 + size


def make_frames(
    n: int,
    *,
    seed: int,
    p_digit: float = 0.2,
    split: Literal["train", "holdout"] = "holdout",
) -> tuple[np.ndarray, np.ndarray]:
    """Make ``n`` frames, reproducibly for a given ``seed`` and ``split``.

    Returns ``(frames, labels)``: frames uint8 ``[n, 1, 64, 64]``; labels int64 ``[n]``,
    :data:`NO_DIGIT` for a frame without a digit, else the digit (0–9). Each frame holds a
    digit with probability ``p_digit``, drawn from the ``split`` subset of the digit images.
    """
    images, labels = digit_pool(split)
    return _render(
        n,
        seed=seed,
        stream=_SPLIT_CODES[split],
        p_digit=p_digit,
        images=images,
        digit_labels=labels,
    )


def frames_from_digits(
    n: int, *, seed: int, images: np.ndarray, labels: np.ndarray, p_digit: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`make_frames`, but drawing digits from ``images`` (float ``[M, 8, 8]`` in
    [0, 1]) with ``labels`` (``[M]``, 0–9): for carving a subset out of a split.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (8, 8) or len(images) == 0:
        raise ValueError(f"images must have shape [M, 8, 8] with M > 0, not {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape [{len(images)}], not {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels must lie in 0..9")
    return _render(
        n, seed=seed, stream=_CUSTOM_CODE, p_digit=p_digit, images=images, digit_labels=labels
    )


def _render(
    n: int,
    *,
    seed: int,
    stream: int,
    p_digit: float,
    images: np.ndarray,
    digit_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not 0.0 <= p_digit <= 1.0:
        raise ValueError(f"p_digit must lie in [0, 1], not {p_digit}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, stream])
    frames = np.empty((int(n), *FRAME_SHAPE), dtype=np.uint8)
    labels = np.full(int(n), NO_DIGIT, dtype=np.int64)
    counts = np.arange(len(_CLUTTER_COUNT_P))
    for i in range(int(n)):
        frame = _background(rng)
        keep_out = None
        if rng.random() < p_digit:
            pick = int(rng.integers(len(images)))
            labels[i] = digit_labels[pick]
            keep_out = _draw_digit(frame, rng, images[pick])
        for _ in range(int(rng.choice(counts, p=_CLUTTER_COUNT_P))):
            _draw_clutter(frame, rng, keep_out)
        frame += rng.uniform(3.0, 12.0) * rng.standard_normal(frame.shape, dtype=np.float32)
        np.clip(np.rint(frame), 0.0, 255.0, out=frame)
        frames[i, 0] = frame
    return frames, labels
