"""The public surface of fogline.sync, and what importing it costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fogline.sync as sync
from fogline.sync import errors

EXPECTED = {
    "ANY_REGION", "BUNDLE_FORMAT", "DEFAULT_EXPIRY", "AgentVersionError", "Bundle",
    "BundleError", "Catalogue", "CloudSpec", "Decision", "DeltaTarget", "DesiredState", "Director",
    "DirectoryStore", "DisagreementError", "EdgeSpec", "ExpiredError", "Expiry", "FetchError",
    "FileEntry", "HomeSettings", "HttpFetcher", "HttpSettings", "KeyRing", "MemoryFetcher",
    "MemoryStore", "MetadataError", "MetadataVersionError", "NonceLedger",
    "NotForThisSiteError", "NotReleasedError", "OversizedError", "Platform", "PlatformError",
    "PublishError", "RefreshReport", "RegionError", "Release", "ReleaseRollbackError",
    "ReplayedReportError", "ReportError", "RepositoryWriter", "SignatureError",
    "SigningKeyError", "SiteIdentity", "SiteState", "SiteSync", "StatusReport",
    "StorageError", "Store", "SyncError", "SyncHome", "TamperedError", "Thresholds",
    "UnsafePathError", "VerificationError", "VerifiedBundle", "WrongSiteError", "check_delta",
    "check_file", "check_target_path", "decide", "enroll", "file_sha256", "generate_key",
    "make_status_report", "manifest_files", "model_signatures", "read_desired", "read_key",
    "verify_status_report", "write_key", "write_manifest",
    # Air-gapped sites.
    "ArchiveError", "ArchiveFetcher", "ExportSummary", "Freshness", "RepositoryFreshness",
    "UnsafeMemberError", "export_bundle", "import_bundle", "read_freshness",
    "RolloutError", "FleetStore",
    "SiteRecord", "Observation", "Rollout", "RolloutPolicy", "Tolerance", "RolloutService",
    "RanBundle",
    "site_files",
    "cloud_files", "TrustedTargets", "trusted_targets",
}  # fmt: skip


def test_the_public_names_are_pinned() -> None:
    assert set(sync.__all__) == EXPECTED
    for name in sync.__all__:
        assert getattr(sync, name) is not None


def test_every_error_has_the_one_root() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SyncError)


def test_bad_data_and_transport_are_apart() -> None:
    assert issubclass(errors.BundleError, errors.VerificationError)
    assert issubclass(errors.VerificationError, ValueError)
    assert not issubclass(errors.FetchError, errors.VerificationError)
    assert not issubclass(errors.StorageError, errors.VerificationError)


@pytest.mark.parametrize(
    "imports",
    [
        "import fogline.sync; from fogline.sync import Bundle, Release, SyncError",
        "import fogline.cli",
    ],
)
def test_importing_bundles_or_the_command_does_not_load_tuf(imports: str) -> None:
    code = (
        f"import sys; {imports}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tuf', 'securesystemslib')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
