"""Feature envelopes of forwarded items: typed meta, the bundle's codec, the zstd probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fogline.compression import Codec, FeatureMeta, Kind, decode_envelope, is_compressed
from fogline.edge_agent._features import FeatureEncoder, uuid4_bytes
from fogline.edge_agent._loaded import LoadedBundle
from tests.conftest import make_tiny_bundle


def _encode(
    tmp_path: Path, rel: float | None, conf: float | None, codec: Codec | None = None
) -> bytes:
    loaded = LoadedBundle.load(make_tiny_bundle(tmp_path / "b"), codec=codec)
    tensors = {"features": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)}
    return FeatureEncoder().encode(loaded, "site-a", b"\x01" * 16, tensors, rel, conf, 123)


def test_the_envelope_carries_typed_feature_meta_and_the_bundles_identity(
    tmp_path: Path,
) -> None:
    env = decode_envelope(_encode(tmp_path, 0.25, 0.5, Codec.FP32))
    assert env.kind is Kind.FEATURES
    assert (env.site, env.bundle, env.created_us, env.codec) == (
        "site-a",
        "tiny@1",
        123,
        Codec.FP32,
    )
    assert FeatureMeta.from_meta(env.meta) == FeatureMeta("forward", 0.25, 0.5)
    assert env.meta == {"decision": "forward", "relevance": 0.25, "exit_confidence": 0.5}


def test_a_nan_from_a_head_is_left_out_of_the_meta_and_the_item_still_travels(
    tmp_path: Path,
) -> None:
    env = decode_envelope(_encode(tmp_path, float("nan"), None))
    assert env.meta == {"decision": "forward"}
    assert FeatureMeta.from_meta(env.meta) == FeatureMeta()


def test_zstd_is_probed_every_64_envelopes_and_followed_in_between(tmp_path: Path) -> None:
    loaded = LoadedBundle.load(make_tiny_bundle(tmp_path / "b"))
    encoder = FeatureEncoder()
    noise = {"features": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
    zeros = {"features": np.zeros((1, 256), dtype=np.float32)}
    # Incompressible features: the first probe turns zstd off for the next 63.
    first = [encoder.encode(loaded, "s", b"\x02" * 16, noise, None, None, 0) for _ in range(64)]
    assert not any(is_compressed(p) for p in first)
    # Envelope 65 probes again and finds that zstd pays for these.
    assert is_compressed(encoder.encode(loaded, "s", b"\x03" * 16, zeros, None, None, 0))
    assert is_compressed(encoder.encode(loaded, "s", b"\x04" * 16, zeros, None, None, 0))


def test_message_ids_are_distinct_version_4_uuids() -> None:
    ids = uuid4_bytes(100)
    assert len(set(ids)) == 100
    assert all(len(i) == 16 and i[6] >> 4 == 4 and i[8] >> 6 == 2 for i in ids)
    assert uuid4_bytes(0) == []
