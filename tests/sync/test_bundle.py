"""Loading and verifying bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fogline.sync import Bundle, BundleError


def test_a_written_bundle_loads_with_its_parts(tiny_bundle: Path) -> None:
    bundle = Bundle.load(tiny_bundle)
    assert bundle.id == "tiny@1"
    assert bundle.edge.feature_outputs == ("features",)
    assert bundle.edge_model_path.is_file()
    assert bundle.cloud.output == "probs"
    assert bundle.labels == ("0", "1", "2", "3")


def test_a_tampered_model_file_is_refused(tiny_bundle: Path) -> None:
    model = tiny_bundle / "cloud.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"cloud\.onnx does not match its SHA-256"):
        Bundle.load(tiny_bundle)


def test_a_missing_file_is_named(tiny_bundle: Path) -> None:
    (tiny_bundle / "edge.onnx").unlink()
    with pytest.raises(BundleError, match=r"edge\.onnx is missing"):
        Bundle.load(tiny_bundle)


def test_a_site_holding_only_the_edge_part_loads_it_as_the_edge_part(tiny_bundle: Path) -> None:
    (tiny_bundle / "cloud.onnx").unlink()
    assert Bundle.load(tiny_bundle, part="edge").edge_model_path.is_file()
    with pytest.raises(BundleError, match=r"cloud\.onnx is missing"):
        Bundle.load(tiny_bundle)
    with pytest.raises(BundleError, match=r"cloud\.onnx is missing"):
        Bundle.load(tiny_bundle, part="cloud")


def test_an_edge_part_load_still_checks_the_files_present(tiny_bundle: Path) -> None:
    (tiny_bundle / "cloud.onnx").unlink()
    model = tiny_bundle / "edge.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match=r"edge\.onnx has the wrong size|edge\.onnx does not"):
        Bundle.load(tiny_bundle, part="edge")
    (tiny_bundle / "edge.onnx").unlink()
    with pytest.raises(BundleError, match=r"edge\.onnx is missing"):
        Bundle.load(tiny_bundle, part="edge")


def test_a_directory_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        Bundle.load(tmp_path)


def test_a_manifest_escaping_its_directory_is_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["files"]["../evil.onnx"] = {"sha256": "0", "bytes": 1}
    (tiny_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unsafe file path"):
        Bundle.load(tiny_bundle)


def test_out_of_range_thresholds_are_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["thresholds"]["exit_confidence"] = 1.5
    (tiny_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="exit_confidence"):
        Bundle.load(tiny_bundle)
