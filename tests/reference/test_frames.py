"""The camera-like frame stream built from scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.reference._frames import (
    FRAME_SHAPE,
    NO_DIGIT,
    digit_pool,
    frames_from_digits,
    make_frames,
)


def test_frames_are_uint8_images_with_int64_labels() -> None:
    frames, labels = make_frames(50, seed=1)
    assert frames.shape == (50, *FRAME_SHAPE) == (50, 1, 64, 64)
    assert frames.dtype == np.uint8
    assert labels.shape == (50,)
    assert labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) <= {NO_DIGIT, *range(10)}


def test_the_same_seed_gives_the_same_stream_and_another_seed_another() -> None:
    a_frames, a_labels = make_frames(200, seed=7)
    b_frames, b_labels = make_frames(200, seed=7)
    c_frames, _ = make_frames(200, seed=8)
    np.testing.assert_array_equal(a_frames, b_frames)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_frames, c_frames)


def test_the_share_of_digit_frames_follows_p_digit() -> None:
    _, labels = make_frames(2000, seed=3)
    assert abs(np.mean(labels != NO_DIGIT) - 0.2) < 0.03  # 3.7 binomial sd
    _, labels = make_frames(2000, seed=3, p_digit=0.6)
    assert abs(np.mean(labels != NO_DIGIT) - 0.6) < 0.035
    assert np.all(make_frames(100, seed=3, p_digit=0.0)[1] == NO_DIGIT)
    assert np.all(make_frames(100, seed=3, p_digit=1.0)[1] != NO_DIGIT)


def test_every_digit_shows_up_in_a_stream() -> None:
    _, labels = make_frames(2000, seed=5, p_digit=0.5, split="train")
    assert set(labels[labels != NO_DIGIT].tolist()) == set(range(10))


def test_frames_are_not_blank_and_digits_add_bright_strokes() -> None:
    frames, labels = make_frames(1000, seed=11, p_digit=0.5)
    spread = frames.reshape(len(frames), -1).std(axis=1)
    assert np.all(spread > 1.0)  # background, noise and clutter everywhere
    bright = np.percentile(frames.reshape(len(frames), -1), 99, axis=1)
    has_digit = labels != NO_DIGIT
    assert np.median(bright[has_digit]) > np.median(bright[~has_digit])


def test_holdout_and_train_digit_images_are_disjoint() -> None:
    train_images, train_labels = digit_pool("train")
    holdout_images, holdout_labels = digit_pool("holdout")
    assert len(train_images) + len(holdout_images) == 1797
    assert 0.2 < len(holdout_images) / 1797 < 0.3
    train_set = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train_set for image in holdout_images)
    assert set(train_labels.tolist()) == set(holdout_labels.tolist()) == set(range(10))


def test_a_split_draws_only_from_its_own_digits() -> None:
    # one distinctive image per class: every digit frame must come from these
    images, labels = digit_pool("holdout")
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    frames, got = frames_from_digits(
        300, seed=2, images=images[firsts], labels=labels[firsts], p_digit=1.0
    )
    assert frames.shape == (300, *FRAME_SHAPE)
    assert set(got.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": -1, "seed": 0}, ValueError),
        ({"n": 2.5, "seed": 0}, TypeError),
        ({"n": 3, "seed": 0, "p_digit": 1.5}, ValueError),
        ({"n": 3, "seed": 0, "split": "test"}, ValueError),
    ],
)
def test_misuse_is_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        make_frames(**kwargs)  # type: ignore[arg-type]


def test_custom_digits_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[M, 8, 8\]"):
        frames_from_digits(3, seed=0, images=np.zeros((4, 8)), labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        frames_from_digits(3, seed=0, images=np.zeros((2, 8, 8)), labels=np.array([0, 10]))
