"""Bundles (the unit of versioning) and, in time, their signing, registry and rollout."""

from fogline.sync._bundle import (
    BUNDLE_FORMAT,
    Bundle,
    CloudSpec,
    EdgeSpec,
    Thresholds,
    file_sha256,
    write_manifest,
)
from fogline.sync.errors import BundleError, SyncError

__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleError",
    "CloudSpec",
    "EdgeSpec",
    "SyncError",
    "Thresholds",
    "file_sha256",
    "write_manifest",
]
