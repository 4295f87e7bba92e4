"""Errors of :mod:`fogline.compression`: one root, split into bad input and failed work."""

from __future__ import annotations

__all__ = [
    "CompressionError",
    "DeltaBaseError",
    "DeltaError",
    "DeltaFormatError",
    "DeltaSizeError",
    "EnvelopeError",
    "MetaError",
    "ModelError",
    "QuantizationError",
    "SplitError",
]


class CompressionError(Exception):
    """Root of every error raised by :mod:`fogline.compression`."""


class EnvelopeError(CompressionError, ValueError):
    """A wire envelope is malformed, truncated, corrupt or of an unknown version.

    ``reason`` is a short machine-friendly label, used to count rejections by cause.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelError(CompressionError, ValueError):
    """A model file or its inputs are unusable (not ONNX, missing tensor, wrong shape)."""


class SplitError(CompressionError):
    """A split could not be made or did not reproduce the original model."""


class QuantizationError(CompressionError):
    """No quantization strategy met the agreement target, or quantization failed."""


class MetaError(EnvelopeError):
    """An envelope's meta does not follow the typed contract (:class:`ResultMeta`,
    :class:`FeatureMeta`). ``field`` names the offending key."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__("bad_meta", f"{field}: {detail}")
        self.field = field


class DeltaError(CompressionError, ValueError):
    """A model delta cannot be applied: the file it rebuilds must come another way."""


class DeltaFormatError(DeltaError):
    """A delta is truncated, corrupt, of an unknown version or kind, or rebuilds a file
    other than the one it names."""


class DeltaBaseError(DeltaError):
    """A delta was made for another base file than the one it is applied to."""


class DeltaSizeError(DeltaError):
    """A delta would rebuild a file longer than the caller allows (the signed length)."""
