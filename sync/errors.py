"""Errors of :mod:`fogline.sync`: one root, split into bad data and failed transport.

Bad data (:class:`VerificationError`, also a :class:`ValueError`) means a repository, a
bundle or a report said something that must not be believed or used: a signature short of
its threshold, metadata older than what is trusted, an artifact that does not match its
hashes, two repositories that disagree, a bundle not meant for this site. Fetching the
same thing again will not help. Transport failures (:class:`FetchError`) mean the data did
not arrive: the same refresh may succeed later. :class:`StorageError` is the local side:
the site's trust state or a repository directory could not be read or written.
:class:`PublishError` and :class:`SigningKeyError` are the publisher's: a release refused,
a signing key missing.
"""

from __future__ import annotations

__all__ = [
    "AgentVersionError",
    "ArchiveError",
    "BundleError",
    "DisagreementError",
    "ExpiredError",
    "FetchError",
    "MetadataError",
    "MetadataVersionError",
    "NotForThisSiteError",
    "NotReleasedError",
    "OversizedError",
    "PlatformError",
    "PublishError",
    "RegionError",
    "ReleaseRollbackError",
    "ReplayedReportError",
    "ReportError",
    "RolloutError",
    "SignatureError",
    "SigningKeyError",
    "StorageError",
    "SyncError",
    "TamperedError",
    "UnsafeMemberError",
    "UnsafePathError",
    "VerificationError",
    "WrongSiteError",
]


class SyncError(Exception):
    """Root of every error raised by :mod:`fogline.sync`."""


# --------------------------------------------------------------------------- bad data


class VerificationError(SyncError, ValueError):
    """Something a repository, a bundle or a report holds must not be used."""


class BundleError(VerificationError):
    """A bundle is malformed, incomplete, or its files do not match the manifest."""


class MetadataError(VerificationError):
    """Repository metadata is malformed or inconsistent (unparsable, a role missing from
    snapshot, a delegation that does not hold)."""


class SignatureError(MetadataError):
    """Metadata is not signed by the threshold of keys its delegator trusts: unsigned,
    under threshold, signed by the wrong keys (another fleet's root of trust)."""


class MetadataVersionError(MetadataError):
    """A metadata version is lower than the trusted one (rollback) or is not the version
    the snapshot or timestamp names (mix-and-match)."""


class ExpiredError(MetadataError):
    """Metadata is past its expiry: the repository stopped being re-signed (freeze)."""


class TamperedError(VerificationError):
    """A file's length or hashes do not match what the signed metadata says."""


class OversizedError(VerificationError):
    """More bytes arrived than the signed length or the metadata bound allows."""


class UnsafePathError(VerificationError):
    """A target name could escape its directory or is not a plain relative path."""


class ArchiveError(VerificationError):
    """A file offered as an export (``fogline bundle export``) is not one: not a tar
    archive, no readable ``export.json``, a member twice, too many members, or one that
    verification needs but the export lacks."""


class UnsafeMemberError(ArchiveError, UnsafePathError):
    """An export holds a member that must never be read: a name that could escape
    (absolute, ``..``, odd segments), a link, a device, a directory or a sparse file."""


class NotReleasedError(VerificationError):
    """The director names a bundle the catalogue never released."""


class DisagreementError(VerificationError):
    """The director and the catalogue disagree on a bundle. ``field`` names what differs
    (``length``, ``hashes``, ``release``, ``platform``, ``regions``, …)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"director and catalogue disagree on {field}: {detail}")
        self.field = field


class ReleaseRollbackError(VerificationError):
    """A bundle's release counter is lower than the one the site already installed."""


class NotForThisSiteError(VerificationError):
    """A verified bundle may not run on this site."""


class WrongSiteError(NotForThisSiteError):
    """The desired state names another site."""


class RegionError(NotForThisSiteError):
    """The bundle is not allowed in the site's region."""


class PlatformError(NotForThisSiteError):
    """The bundle needs an onnxruntime version or execution provider the site lacks."""


class AgentVersionError(NotForThisSiteError):
    """The bundle needs a newer agent than the site runs."""


class ReportError(VerificationError):
    """A status report is malformed, or not signed by the key of the site it names."""


class ReplayedReportError(ReportError):
    """A status report carries a nonce that was already used or never issued to its site."""


# -------------------------------------------------------------------------- transport


class FetchError(SyncError):
    """A file could not be downloaded. ``status`` is the HTTP status, where one came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------- local state


class StorageError(SyncError):
    """The site's trust state or a repository directory could not be read or written."""


# --------------------------------------------------------------------------- publisher


class PublishError(SyncError, ValueError):
    """A release, a desired state or a repository change was refused: a release counter
    not greater than every earlier one, a name already released, a bad name."""


class RolloutError(SyncError, ValueError):
    """A rollout or fleet change was refused: an unknown site or bundle, a registration
    that conflicts with the one stored, a second rollout of a fleet, an operation the
    rollout's state does not allow (resuming a completed rollout)."""


class SigningKeyError(SyncError):
    """A signing key is missing, unreadable, or too few keys are present for a role's
    threshold."""
