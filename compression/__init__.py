"""Model split, INT8 quantization, and the feature codec with its wire envelope."""

from fogline.compression._codec import (
    ENVELOPE_VERSION,
    Codec,
    Envelope,
    Kind,
    decode_envelope,
    encode_envelope,
    now_us,
)
from fogline.compression.errors import (
    CompressionError,
    EnvelopeError,
    ModelError,
    QuantizationError,
    SplitError,
)

__all__ = [
    "ENVELOPE_VERSION",
    "Codec",
    "CompressionError",
    "Envelope",
    "EnvelopeError",
    "Kind",
    "ModelError",
    "QuantizationError",
    "SplitError",
    "decode_envelope",
    "encode_envelope",
    "now_us",
]
