"""Model split, INT8 quantization, and the feature codec with its wire envelope.

The codec is imported eagerly: the edge agent and the cloud worker use it on every message.
The model tools (split, quantization) need onnx and onnxruntime's quantization tooling, which
an edge-only install may lack, so they load on first use; so do the model deltas
(:func:`make_delta`, :func:`apply_delta`: only the sync client and the publisher use them)
and :func:`onnxruntime_errors` (the one map of onnxruntime's errors), which imports
onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fogline.compression._codec import (
    ENVELOPE_VERSION,
    MAX_MESSAGE_BYTES,
    Codec,
    Envelope,
    Kind,
    decode_envelope,
    decode_message,
    encode_envelope,
    is_compressed,
    is_resent,
    join_envelopes,
    mark_resent,
    now_us,
)
from fogline.compression._meta import FeatureMeta, ResultMeta, ResultStatus
from fogline.compression.errors import (
    CompressionError,
    DeltaBaseError,
    DeltaError,
    DeltaFormatError,
    DeltaSizeError,
    EnvelopeError,
    MetaError,
    ModelError,
    QuantizationError,
    SplitError,
)

if TYPE_CHECKING:
    from fogline.compression._delta import DeltaHeader, apply_delta, make_delta, read_delta_header
    from fogline.compression._ort_errors import onnxruntime_errors
    from fogline.compression._quantize import QuantizationReport, quantize_model
    from fogline.compression._split import SplitReport, split_model

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_MESSAGE_BYTES",
    "Codec",
    "CompressionError",
    "DeltaBaseError",
    "DeltaError",
    "DeltaFormatError",
    "DeltaHeader",
    "DeltaSizeError",
    "Envelope",
    "EnvelopeError",
    "FeatureMeta",
    "Kind",
    "MetaError",
    "ModelError",
    "QuantizationError",
    "QuantizationReport",
    "ResultMeta",
    "ResultStatus",
    "SplitError",
    "SplitReport",
    "apply_delta",
    "decode_envelope",
    "decode_message",
    "encode_envelope",
    "is_compressed",
    "is_resent",
    "join_envelopes",
    "make_delta",
    "mark_resent",
    "now_us",
    "onnxruntime_errors",
    "quantize_model",
    "read_delta_header",
    "split_model",
]

_LAZY = {
    "DeltaHeader": "fogline.compression._delta",
    "apply_delta": "fogline.compression._delta",
    "make_delta": "fogline.compression._delta",
    "read_delta_header": "fogline.compression._delta",
    "onnxruntime_errors": "fogline.compression._ort_errors",
    "QuantizationReport": "fogline.compression._quantize",
    "quantize_model": "fogline.compression._quantize",
    "SplitReport": "fogline.compression._split",
    "split_model": "fogline.compression._split",
}


def __getattr__(name: str) -> Any:
    """Load the model tools on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
