"""The bundle: the unit of versioning shared by the edge and the cloud.

A bundle is a directory with ``manifest.json`` and the model files it names::

    {
      "format": 1,
      "name": "reference", "version": "1",
      "files": {"edge.onnx": {"sha256": "…", "bytes": 123}, …},
      "edge": {
        "model": "edge.onnx",            # INT8 edge part
        "input": "frame",                # its (single) input
        "filter_output": "relevance",    # P(anything there), shape [N] or [N, 1]; optional
        "exit_output": "exit_probs",     # class probabilities, shape [N, C]; optional
        "feature_outputs": ["features"]  # what crosses the cut, fed to the cloud part
      },
      "cloud": {"model": "cloud.onnx", "output": "probs"},
      "thresholds": {"relevance": 0.5, "exit_confidence": 0.9},
      "codec": {"kind": "int8", "zstd_level": 3},
      "labels": ["0", …],
      …  # free-form: metrics, build settings, extra models (fp32 edge, full model)
    }

Each side loads only its part; the hash check proves the files are the ones the
manifest names. Signing the manifest belongs to the sync service.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogline.sync.errors import BundleError

__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "CloudSpec",
    "EdgeSpec",
    "Thresholds",
    "file_sha256",
    "write_manifest",
]

BUNDLE_FORMAT = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Thresholds:
    """Edge decision thresholds: drop below ``relevance``, answer locally at ``exit_confidence``."""

    relevance: float = 0.5
    exit_confidence: float = 0.9

    def __post_init__(self) -> None:
        for name in ("relevance", "exit_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold {name}={value} must lie in [0, 1]")


@dataclass(frozen=True)
class EdgeSpec:
    model: str
    input: str
    feature_outputs: tuple[str, ...]
    filter_output: str | None = None
    exit_output: str | None = None


@dataclass(frozen=True)
class CloudSpec:
    model: str
    output: str


def _require(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise BundleError(f"manifest {where} is missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise BundleError(f"manifest {where}.{key} must be a {kind.__name__}")
    return value


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    name: str
    version: str
    edge: EdgeSpec
    cloud: CloudSpec
    thresholds: Thresholds
    codec: str
    zstd_level: int
    labels: tuple[str, ...]
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        """``name@version``: how feature messages name the bundle."""
        return f"{self.name}@{self.version}"

    def path(self, filename: str) -> Path:
        if filename not in self.manifest["files"]:
            raise BundleError(f"bundle {self.id} has no file {filename!r}")
        return self.root / filename

    @property
    def edge_model_path(self) -> Path:
        return self.path(self.edge.model)

    @property
    def cloud_model_path(self) -> Path:
        return self.path(self.cloud.model)

    @classmethod
    def load(cls, root: str | Path, *, verify: bool = True, part: str | None = None) -> Bundle:
        """Read ``root/manifest.json``; with ``verify``, check every file's size and SHA-256.

        ``part`` (``"edge"`` or ``"cloud"``) loads the bundle as one side holds it: a site
        downloads only its edge model (docs/sync.md), so only that file must be present;
        every file that is present is still checked.
        """
        if part not in (None, "edge", "cloud"):
            raise ValueError(f"part must be 'edge', 'cloud' or None, got {part!r}")
        root = Path(root)
        mpath = root / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise BundleError(f"{root} is not a bundle: no manifest.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath} must hold a JSON object")
        if manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{mpath}: unsupported bundle format {manifest.get('format')!r}")
        files = _require(manifest, "files", dict, "")
        needed = None
        if part is not None:
            side = manifest.get(part)
            needed = side.get("model") if isinstance(side, dict) else None
        for fname, info in files.items():
            if "/" in fname or fname.startswith("."):
                raise BundleError(f"manifest names an unsafe file path {fname!r}")
            fpath = root / fname
            if not fpath.is_file():
                if part is not None and fname != needed:
                    continue
                raise BundleError(f"bundle file {fname} is missing from {root}")
            if verify:
                if fpath.stat().st_size != info.get("bytes"):
                    raise BundleError(f"bundle file {fname} has the wrong size")
                if file_sha256(fpath) != info.get("sha256"):
                    raise BundleError(f"bundle file {fname} does not match its SHA-256")
        e = _require(manifest, "edge", dict, "")
        c = _require(manifest, "cloud", dict, "")
        edge = EdgeSpec(
            model=_require(e, "model", str, "edge"),
            input=_require(e, "input", str, "edge"),
            feature_outputs=tuple(_require(e, "feature_outputs", list, "edge")),
            filter_output=e.get("filter_output"),
            exit_output=e.get("exit_output"),
        )
        cloud = CloudSpec(
            model=_require(c, "model", str, "cloud"), output=_require(c, "output", str, "cloud")
        )
        for fname in (edge.model, cloud.model):
            if fname not in files:
                raise BundleError(f"manifest refers to {fname!r}, which is not in its files")
        th = manifest.get("thresholds", {})
        codec = manifest.get("codec", {})
        try:
            thresholds = Thresholds(
                relevance=float(th.get("relevance", 0.5)),
                exit_confidence=float(th.get("exit_confidence", 0.9)),
            )
        except (TypeError, ValueError) as exc:
            raise BundleError(f"manifest thresholds are invalid: {exc}") from exc
        return cls(
            root=root,
            name=_require(manifest, "name", str, ""),
            version=str(_require(manifest, "version", str, "")),
            edge=edge,
            cloud=cloud,
            thresholds=thresholds,
            codec=str(codec.get("kind", "int8")),
            zstd_level=int(codec.get("zstd_level", 3)),
            labels=tuple(str(x) for x in manifest.get("labels", [])),
            manifest=manifest,
        )


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Fill ``files`` with sizes and hashes of the named files and write ``manifest.json``."""
    files = {}
    for fname in sorted(manifest.get("files", {})):
        fpath = root / fname
        files[fname] = {"sha256": file_sha256(fpath), "bytes": fpath.stat().st_size}
    manifest = {**manifest, "format": BUNDLE_FORMAT, "files": files}
    out = root / "manifest.json"
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
