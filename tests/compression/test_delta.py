"""Model deltas: tensor-aware for ONNX (copy, byte-wise difference, literal), a zstd patch
for anything else; apply rebuilds the new file byte for byte, and refuses a delta for
another base, one too large for the caller's bound, and a truncated or corrupt one."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline._bench_delta import fine_tune, int8_model, int8_tensors, replace_tensors
from fogline.compression import (
    CompressionError,
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaSizeError,
    apply_delta,
    make_delta,
    read_delta_header,
)
from fogline.compression._delta import DeltaKind

TENSOR_BYTES = 8 * 1024


@pytest.fixture(scope="module")
def tensors() -> list[np.ndarray]:
    return int8_tensors(np.random.default_rng(1), 40, TENSOR_BYTES)


@pytest.fixture(scope="module")
def old(tensors: list[np.ndarray]) -> bytes:
    return int8_model(tensors)


@pytest.fixture(scope="module")
def fine_tuned(tensors: list[np.ndarray]) -> bytes:
    return int8_model(fine_tune(tensors, 0.10, np.random.default_rng(2)))


@pytest.fixture(scope="module")
def delta(old: bytes, fine_tuned: bytes) -> bytes:
    return make_delta(old, fine_tuned)


def test_replacing_4_of_40_tensors_sends_about_a_tenth_of_the_file(
    tensors: list[np.ndarray], old: bytes
) -> None:
    new = int8_model(replace_tensors(tensors, (0, 10, 20, 30), np.random.default_rng(3)))
    delta = make_delta(old, new)
    assert read_delta_header(delta).kind == DeltaKind.TENSOR
    assert len(delta) <= 0.15 * len(new)
    assert apply_delta(old, delta, max_output=len(new)) == new


def test_moving_a_tenth_of_the_values_by_one_sends_a_small_difference(
    old: bytes, fine_tuned: bytes, delta: bytes
) -> None:
    assert len(delta) <= 0.15 * len(fine_tuned)
    assert apply_delta(old, delta, max_output=len(fine_tuned)) == fine_tuned


def test_an_unchanged_model_is_all_copies(old: bytes) -> None:
    delta = make_delta(old, old)
    assert len(delta) < 1024
    assert apply_delta(old, delta) == old


def test_tensors_that_moved_or_were_renamed_are_copied_by_content(
    tensors: list[np.ndarray], old: bytes
) -> None:
    new = int8_model(list(reversed(tensors)), name="renamed")
    delta = make_delta(old, new)
    assert len(delta) < 0.02 * len(new)
    assert apply_delta(old, delta) == new


def test_the_header_names_base_and_result(old: bytes, fine_tuned: bytes, delta: bytes) -> None:
    header = read_delta_header(delta)
    assert header.version == 1
    assert header.base_sha256 == hashlib.sha256(old).hexdigest()
    assert header.result_sha256 == hashlib.sha256(fine_tuned).hexdigest()
    assert header.result_length == len(fine_tuned)


@pytest.mark.parametrize(
    ("old_file", "new_file"),
    [
        (b"", b"a first version"),
        (b"plain text, version 1\n" * 500, b"plain text, version 2\n" * 500),
        (b"\x08\x07" + bytes(range(256)) * 50, b"\x08\x07" + bytes(range(256)) * 51),
    ],
    ids=["empty-base", "text", "broken-protobuf"],
)
def test_a_file_that_is_not_onnx_gets_a_generic_patch(old_file: bytes, new_file: bytes) -> None:
    delta = make_delta(old_file, new_file)
    assert read_delta_header(delta).kind == DeltaKind.PATCH
    assert apply_delta(old_file, delta) == new_file
    if len(old_file) > 1000:
        assert len(delta) < 0.2 * len(new_file)


def test_an_onnx_file_against_a_non_onnx_base_gets_a_generic_patch(old: bytes) -> None:
    delta = make_delta(b"not a model", old)
    assert read_delta_header(delta).kind == DeltaKind.PATCH
    assert apply_delta(b"not a model", delta) == old


def test_apply_refuses_a_delta_for_another_base(old: bytes, delta: bytes) -> None:
    other = old[:-1] + bytes([old[-1] ^ 1])
    with pytest.raises(DeltaBaseError, match="applies to a file with sha256"):
        apply_delta(other, delta)


def test_apply_refuses_a_result_larger_than_the_callers_bound(
    old: bytes, fine_tuned: bytes, delta: bytes
) -> None:
    with pytest.raises(DeltaSizeError, match=f"more than the allowed {len(fine_tuned) - 1}"):
        apply_delta(old, delta, max_output=len(fine_tuned) - 1)
    assert apply_delta(old, delta, max_output=len(fine_tuned)) == fine_tuned


def test_apply_refuses_a_generic_patch_larger_than_the_bound() -> None:
    delta = make_delta(b"abc" * 100, b"abcd" * 100)
    with pytest.raises(DeltaSizeError):
        apply_delta(b"abc" * 100, delta, max_output=399)


@pytest.mark.parametrize("cut", [0, 3, 40, 83, 84, 90, 120, -1])
def test_apply_refuses_a_truncated_delta(old: bytes, delta: bytes, cut: int) -> None:
    with pytest.raises(DeltaFormatError):
        apply_delta(old, delta[:cut])


def test_apply_refuses_an_unknown_version_or_kind(old: bytes, delta: bytes) -> None:
    with pytest.raises(DeltaFormatError, match="version 2 is not supported"):
        apply_delta(old, delta[:4] + b"\x02" + delta[5:])
    with pytest.raises(DeltaFormatError, match="unknown delta kind 9"):
        apply_delta(old, delta[:5] + b"\x09" + delta[6:])
    with pytest.raises(DeltaFormatError, match="bad magic"):
        apply_delta(old, b"GZIP" + delta[4:])


def test_apply_refuses_a_delta_whose_result_is_not_what_it_names(old: bytes, delta: bytes) -> None:
    # A valid delta whose header claims another result: the rebuilt file is checked.
    forged = delta[:40] + bytes(32) + delta[72:]
    with pytest.raises(DeltaFormatError, match="does not match the SHA-256"):
        apply_delta(old, forged)


def test_apply_refuses_operations_that_read_past_the_old_file(old: bytes) -> None:
    import zstandard

    from fogline.compression._delta import _HEADER, _OP, _OP_COPY, _TENSOR_HEADER

    new = old[:2048]
    ops = zstandard.ZstdCompressor().compress(_OP.pack(_OP_COPY, len(old) - 100, 2048))
    empty = zstandard.ZstdCompressor().compress(b"")
    forged = b"".join(
        (
            _HEADER.pack(
                b"FGLD",
                1,
                DeltaKind.TENSOR,
                0,
                hashlib.sha256(old).digest(),
                hashlib.sha256(new).digest(),
                len(new),
            ),
            _TENSOR_HEADER.pack(1, len(ops), 0, len(empty), 0, len(empty)),
            ops,
            empty,
            empty,
        )
    )
    with pytest.raises(DeltaFormatError, match="past the old file"):
        apply_delta(old, forged)


def test_delta_errors_share_the_package_root() -> None:
    for cls in (DeltaFormatError, DeltaBaseError, DeltaSizeError):
        assert issubclass(cls, DeltaError)
        assert issubclass(cls, CompressionError)
        assert issubclass(cls, ValueError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_corrupted_delta_rebuilds_the_file_exactly_or_raises_a_delta_error(
    old: bytes, fine_tuned: bytes, delta: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(delta)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        mutated[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)))]
    try:
        out = apply_delta(old, bytes(mutated), max_output=len(fine_tuned))
    except DeltaError:
        return
    assert out == fine_tuned


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=400), kind=st.sampled_from([1, 2]))
def test_any_body_after_a_valid_header_is_a_delta_error_or_the_right_file(
    body: bytes, kind: int
) -> None:
    old, new = b"old contents", b"new contents"
    header = struct.pack(
        "<4sBBH32s32sQ",
        b"FGLD",
        1,
        kind,
        0,
        hashlib.sha256(old).digest(),
        hashlib.sha256(new).digest(),
        len(new),
    )
    try:
        out = apply_delta(old, header + body, max_output=1 << 20)
    except DeltaError:
        return
    assert out == new


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    change=st.sampled_from(["replace", "finetune", "grow", "shrink"]),
)
def test_any_pair_of_models_round_trips_byte_exactly(
    sizes: list[int], seed: int, change: str
) -> None:
    rng = np.random.default_rng(seed)
    tensors = [int8_tensors(rng, 1, max(n, 1))[0] for n in sizes]
    if change == "replace":
        changed = replace_tensors(tensors, [0], rng)
    elif change == "finetune":
        changed = fine_tune(tensors, 0.3, rng)
    elif change == "grow":
        changed = [*tensors, int8_tensors(rng, 1, 2000)[0]]
    else:
        changed = tensors[1:]
    old, new = int8_model(tensors), int8_model(changed)
    assert apply_delta(old, make_delta(old, new), max_output=len(new)) == new


def test_apply_and_make_work_without_onnx_installed(
    old: bytes, fine_tuned: bytes, tmp_path: Path
) -> None:
    """An ``[edge]``-only site has no onnx: a delta still applies, and one made there (by
    the wire walk alone) is the same tensor-aware kind."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["onnx"] = None  # import onnx fails, as where it is not installed
        from fogline.compression import apply_delta, make_delta, read_delta_header
        old, new, delta = (open(p, "rb").read() for p in sys.argv[1:4])
        assert apply_delta(old, delta) == new
        again = make_delta(old, new)
        assert read_delta_header(again).kind == 1
        assert apply_delta(old, again) == new
        assert "onnx" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        print("ok")
        """
    )
    paths = []
    for name, data in (("old", old), ("new", fine_tuned), ("delta", make_delta(old, fine_tuned))):
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, "-c", script, *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
