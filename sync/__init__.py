"""Bundles (the unit of versioning) and their signed sync over two TUF repositories.

- **Bundles**: :class:`Bundle` (load and verify a bundle directory), :func:`write_manifest`.
- **Releases**: :class:`Release` (a released bundle: name, version, release counter,
  :class:`Platform`, allowed regions, minimum agent version, manifest length and hash).
- **Publishing** (python-tuf's metadata API): :class:`RepositoryWriter` over a store
  (:class:`DirectoryStore`, :class:`MemoryStore`), the :class:`Catalogue` of releases and the
  :class:`Director` of per-site desired state, and :class:`SyncHome`, the publisher's
  directory with both repositories and their keys (:class:`KeyRing`).
- **Sites**: :func:`enroll` once, then :class:`SiteSync` refreshes both repositories with
  fresh python-tuf ``Updater`` objects over a fetcher (:class:`HttpFetcher`,
  :class:`MemoryFetcher`) and returns a :class:`VerifiedBundle`.
- **Air-gapped sites**: :func:`export_bundle` writes one file holding what a site needs;
  :func:`import_bundle` verifies and installs it there through an :class:`ArchiveFetcher`
  (it is :class:`SiteSync` over the file); :func:`read_freshness` and
  :meth:`SiteSync.freshness` say when the trusted metadata expires.
- **Verification without I/O**: :func:`read_desired`, :func:`decide`,
  :func:`manifest_files`, :func:`check_file`, :func:`site_files`, :func:`cloud_files`,
  :func:`check_delta` over :class:`SiteState`.
- **Repositories read where they are stored**: :func:`trusted_targets` verifies a
  repository's metadata in a :class:`Store` from its trusted root and returns
  :class:`TrustedTargets` (every listed target, verified reads of the stored files, a
  catalogue's releases, a director's desired state): what the cloud loads bundles from.
- **Deltas**: the catalogue publishes, with each release, deltas from the previous
  release's files (:class:`DeltaTarget`); a site copies what it holds and rebuilds what
  changed from them (:mod:`fogline.compression`'s :func:`apply_delta`).
- **Status reports**: :func:`make_status_report`, :func:`verify_status_report`,
  :class:`NonceLedger`.
- **Rollouts**: the pure planner (:class:`Rollout`, :class:`RolloutPolicy`,
  :class:`Tolerance`, :class:`Observation`), the :class:`FleetStore` (SQLAlchemy: SQLite or
  PostgreSQL) and the :class:`RolloutService` over both and the director.

Only the bundle, release and error types load eagerly: the edge and the cloud import them
on every start. Everything built on python-tuf loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fogline.sync._bundle import (
    BUNDLE_FORMAT,
    Bundle,
    CloudSpec,
    EdgeSpec,
    Thresholds,
    file_sha256,
    write_manifest,
)
from fogline.sync._names import ANY_REGION, check_target_path
from fogline.sync._release import Platform, Release
from fogline.sync.errors import (
    AgentVersionError,
    ArchiveError,
    BundleError,
    DisagreementError,
    ExpiredError,
    FetchError,
    MetadataError,
    MetadataVersionError,
    NotForThisSiteError,
    NotReleasedError,
    OversizedError,
    PlatformError,
    PublishError,
    RegionError,
    ReleaseRollbackError,
    ReplayedReportError,
    ReportError,
    RolloutError,
    SignatureError,
    SigningKeyError,
    StorageError,
    SyncError,
    TamperedError,
    UnsafeMemberError,
    UnsafePathError,
    VerificationError,
    WrongSiteError,
)

if TYPE_CHECKING:
    from fogline.sync._catalogue import Catalogue, DeltaTarget, Director
    from fogline.sync._client import SiteIdentity, SiteSync, VerifiedBundle, enroll
    from fogline.sync._export import ArchiveFetcher, ExportSummary, export_bundle, import_bundle
    from fogline.sync._fetch import HttpFetcher, HttpSettings, MemoryFetcher
    from fogline.sync._fleet import FleetStore, SiteRecord
    from fogline.sync._freshness import Freshness, RepositoryFreshness, read_freshness
    from fogline.sync._home import DEFAULT_EXPIRY, HomeSettings, SyncHome
    from fogline.sync._keys import KeyRing, generate_key, read_key, write_key
    from fogline.sync._report import (
        NonceLedger,
        StatusReport,
        make_status_report,
        verify_status_report,
    )
    from fogline.sync._rollout import Observation, Rollout, RolloutPolicy, Tolerance
    from fogline.sync._rollout_service import RolloutService
    from fogline.sync._signatures import model_signatures
    from fogline.sync._store import DirectoryStore, MemoryStore, Store
    from fogline.sync._trusted import TrustedTargets, trusted_targets
    from fogline.sync._verify import (
        Decision,
        DesiredState,
        FileEntry,
        RanBundle,
        SiteState,
        check_delta,
        check_file,
        cloud_files,
        decide,
        manifest_files,
        read_desired,
        site_files,
    )
    from fogline.sync._writer import Expiry, RefreshReport, RepositoryWriter

__all__ = [
    "ANY_REGION",
    "BUNDLE_FORMAT",
    "DEFAULT_EXPIRY",
    "AgentVersionError",
    "ArchiveError",
    "ArchiveFetcher",
    "Bundle",
    "BundleError",
    "Catalogue",
    "CloudSpec",
    "Decision",
    "DeltaTarget",
    "DesiredState",
    "Director",
    "DirectoryStore",
    "DisagreementError",
    "EdgeSpec",
    "ExpiredError",
    "Expiry",
    "ExportSummary",
    "FetchError",
    "FileEntry",
    "FleetStore",
    "Freshness",
    "HomeSettings",
    "HttpFetcher",
    "HttpSettings",
    "KeyRing",
    "MemoryFetcher",
    "MemoryStore",
    "MetadataError",
    "MetadataVersionError",
    "NonceLedger",
    "NotForThisSiteError",
    "NotReleasedError",
    "Observation",
    "OversizedError",
    "Platform",
    "PlatformError",
    "PublishError",
    "RanBundle",
    "RefreshReport",
    "RegionError",
    "Release",
    "ReleaseRollbackError",
    "ReplayedReportError",
    "ReportError",
    "RepositoryFreshness",
    "RepositoryWriter",
    "Rollout",
    "RolloutError",
    "RolloutPolicy",
    "RolloutService",
    "SignatureError",
    "SigningKeyError",
    "SiteIdentity",
    "SiteRecord",
    "SiteState",
    "SiteSync",
    "StatusReport",
    "StorageError",
    "Store",
    "SyncError",
    "SyncHome",
    "TamperedError",
    "Thresholds",
    "Tolerance",
    "TrustedTargets",
    "UnsafeMemberError",
    "UnsafePathError",
    "VerificationError",
    "VerifiedBundle",
    "WrongSiteError",
    "check_delta",
    "check_file",
    "check_target_path",
    "cloud_files",
    "decide",
    "enroll",
    "export_bundle",
    "file_sha256",
    "generate_key",
    "import_bundle",
    "make_status_report",
    "manifest_files",
    "model_signatures",
    "read_desired",
    "read_freshness",
    "read_key",
    "site_files",
    "trusted_targets",
    "verify_status_report",
    "write_key",
    "write_manifest",
]

_LAZY = {
    "Catalogue": "fogline.sync._catalogue",
    "DeltaTarget": "fogline.sync._catalogue",
    "Director": "fogline.sync._catalogue",
    "SiteIdentity": "fogline.sync._client",
    "SiteSync": "fogline.sync._client",
    "VerifiedBundle": "fogline.sync._client",
    "enroll": "fogline.sync._client",
    "ArchiveFetcher": "fogline.sync._export",
    "ExportSummary": "fogline.sync._export",
    "export_bundle": "fogline.sync._export",
    "import_bundle": "fogline.sync._export",
    "Freshness": "fogline.sync._freshness",
    "RepositoryFreshness": "fogline.sync._freshness",
    "read_freshness": "fogline.sync._freshness",
    "HttpFetcher": "fogline.sync._fetch",
    "HttpSettings": "fogline.sync._fetch",
    "MemoryFetcher": "fogline.sync._fetch",
    "FleetStore": "fogline.sync._fleet",
    "SiteRecord": "fogline.sync._fleet",
    "Observation": "fogline.sync._rollout",
    "Rollout": "fogline.sync._rollout",
    "RolloutPolicy": "fogline.sync._rollout",
    "Tolerance": "fogline.sync._rollout",
    "RolloutService": "fogline.sync._rollout_service",
    "DEFAULT_EXPIRY": "fogline.sync._home",
    "HomeSettings": "fogline.sync._home",
    "SyncHome": "fogline.sync._home",
    "KeyRing": "fogline.sync._keys",
    "generate_key": "fogline.sync._keys",
    "read_key": "fogline.sync._keys",
    "write_key": "fogline.sync._keys",
    "NonceLedger": "fogline.sync._report",
    "StatusReport": "fogline.sync._report",
    "make_status_report": "fogline.sync._report",
    "verify_status_report": "fogline.sync._report",
    "model_signatures": "fogline.sync._signatures",
    "DirectoryStore": "fogline.sync._store",
    "MemoryStore": "fogline.sync._store",
    "Store": "fogline.sync._store",
    "TrustedTargets": "fogline.sync._trusted",
    "trusted_targets": "fogline.sync._trusted",
    "Decision": "fogline.sync._verify",
    "DesiredState": "fogline.sync._verify",
    "FileEntry": "fogline.sync._verify",
    "RanBundle": "fogline.sync._verify",
    "SiteState": "fogline.sync._verify",
    "check_delta": "fogline.sync._verify",
    "check_file": "fogline.sync._verify",
    "cloud_files": "fogline.sync._verify",
    "decide": "fogline.sync._verify",
    "manifest_files": "fogline.sync._verify",
    "read_desired": "fogline.sync._verify",
    "site_files": "fogline.sync._verify",
    "Expiry": "fogline.sync._writer",
    "RefreshReport": "fogline.sync._writer",
    "RepositoryWriter": "fogline.sync._writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fogline.sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
