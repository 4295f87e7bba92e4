"""The FEATURES envelope of a forwarded item, and fresh message ids for a batch of them.

The meta is a :class:`~fogline.compression.FeatureMeta`; the tensors are the bundle's
feature outputs for that item, encoded with the bundle's codec. Whether zstd pays off
depends on those tensors, which keep their size from item to item: every 64th envelope
tries it and the others follow what it showed.
"""

from __future__ import annotations

import math
import os

import numpy as np

from fogline.compression import Envelope, FeatureMeta, Kind, encode_envelope, is_compressed
from fogline.edge_agent._loaded import LoadedBundle

__all__ = ["FeatureEncoder", "uuid4_bytes"]

_COMPRESS_PROBE_EVERY = 64


class FeatureEncoder:
    """Feature envelopes for one agent. Used from one thread at a time per batch; a lost
    update of the probe state under concurrent batches costs at most one choice."""

    def __init__(self) -> None:
        self._compress = True
        self._encoded = 0

    def encode(
        self,
        loaded: LoadedBundle,
        site: str,
        message_id: bytes,
        tensors: dict[str, np.ndarray],
        relevance: float | None,
        exit_confidence: float | None,
        created_us: int,
    ) -> bytes:
        """The envelope's bytes; raises ``ValueError`` for what cannot be encoded."""
        probe = self._encoded % _COMPRESS_PROBE_EVERY == 0
        self._encoded += 1
        # A NaN from a head forwards the item (the pipeline's rule) but says nothing about
        # it, and the meta carries finite numbers only.
        meta = FeatureMeta("forward", _finite(relevance), _finite(exit_confidence))
        payload = encode_envelope(
            Envelope(
                Kind.FEATURES,
                message_id,
                site,
                loaded.id,
                tensors,
                meta.to_meta(),
                created_us,
                0,
                loaded.codec,
            ),
            zstd_level=loaded.zstd_level,
            compress=probe or self._compress,
        )
        if probe:
            self._compress = is_compressed(payload)
        return payload


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def uuid4_bytes(n: int) -> list[bytes]:
    """``n`` random version-4 UUIDs as bytes, from one call to the OS random source."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    flat = raw.tobytes()
    return [flat[16 * k : 16 * k + 16] for k in range(n)]
