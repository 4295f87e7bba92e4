"""onnxruntime's errors, mapped in one place for the whole distribution.

onnxruntime raises exception classes of its own (``Fail``, ``InvalidArgument``,
``NoSuchFile``, ``InvalidProtobuf``, ``EPFail``, … in its compiled
``onnxruntime_pybind11_state`` module, none a subclass of anything in the standard library)
and, from its Python layer, plain ``RuntimeError``, ``ValueError`` and ``OSError``. The
classes are found by walking that module, so a kind added by a later onnxruntime is
mapped without a change here. Each package maps them into its own error root with
:func:`onnxruntime_errors`, so the edge and the cloud keep their own roots while the
enumeration lives here.

Only onnx-free imports: the edge installs onnxruntime without onnx.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

__all__ = ["ONNXRUNTIME_EXCEPTIONS", "ORT_PREFIX", "onnxruntime_errors"]

_NATIVE: tuple[type[Exception], ...] = tuple(
    obj for obj in vars(_ort_state).values() if isinstance(obj, type) and issubclass(obj, Exception)
)
# What onnxruntime's Python layer raises itself: a feed that misses an input (ValueError),
# a value it cannot convert to a tensor (RuntimeError), a model file it cannot read.
_PYTHON_SIDE: tuple[type[Exception], ...] = (RuntimeError, ValueError, OSError)

ONNXRUNTIME_EXCEPTIONS: tuple[type[Exception], ...] = (*_NATIVE, *_PYTHON_SIDE)
"""Everything onnxruntime raises when a model cannot be loaded or run."""

# onnxruntime prefixes messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "
ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_MAX_DETAIL = 500


def _detail(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = ORT_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 1] + "…"


@contextlib.contextmanager
def onnxruntime_errors(*, into: type[Exception], what: str) -> Iterator[None]:
    """Map every onnxruntime error raised in the block into ``into``.

    The new error reads ``"<what>: <onnxruntime's message> (onnxruntime <kind>)"`` and
    keeps the upstream one as ``__cause__``. ``into`` is built with that one message, so it
    must accept a single string. An ``into`` already raised in the block passes unchanged
    (a package error may itself be a ``ValueError``); so does anything onnxruntime does
    not raise. Wrap only the onnxruntime calls: the block's own ``ValueError`` would be
    mapped too.

        with onnxruntime_errors(into=ModelError, what=f"load model {path}"):
            session = ort.InferenceSession(str(path))
    """
    if not (isinstance(into, type) and issubclass(into, Exception)):
        raise TypeError(f"into must be an Exception class, not {into!r}")
    if not isinstance(what, str) or not what:
        raise ValueError("what must be a non-empty string")
    try:
        yield
    except into:
        raise
    except ONNXRUNTIME_EXCEPTIONS as exc:
        raise into(f"{what}: {_detail(exc)} (onnxruntime {type(exc).__name__})") from exc
