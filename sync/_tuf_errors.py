"""The one map from python-tuf's (and securesystemslib's) errors to :mod:`fogline.sync`'s.

python-tuf splits its errors as we do: ``RepositoryError`` for bad remote data and
``DownloadError`` for transport. One of its download errors is bad data all the same —
``DownloadLengthMismatchError``, more bytes than signed — and becomes
:class:`OversizedError`. A signer whose private key does not match its public key is a
:class:`SigningKeyError`. Local files (the trust cache) fail with ``OSError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from securesystemslib import exceptions as sslib_exceptions
from tuf.api import exceptions as tuf_exceptions

from fogline.sync.errors import (
    ExpiredError,
    FetchError,
    MetadataError,
    MetadataVersionError,
    OversizedError,
    SignatureError,
    SigningKeyError,
    StorageError,
    SyncError,
    TamperedError,
)

__all__ = ["error_for", "tuf_errors"]

# Most specific first: the first class an error is an instance of decides.
_MAP: tuple[tuple[type[BaseException], type[SyncError]], ...] = (
    (tuf_exceptions.UnsignedMetadataError, SignatureError),
    (tuf_exceptions.BadVersionNumberError, MetadataVersionError),
    (tuf_exceptions.ExpiredMetadataError, ExpiredError),
    (tuf_exceptions.LengthOrHashMismatchError, TamperedError),
    (sslib_exceptions.StorageError, StorageError),
    (tuf_exceptions.RepositoryError, MetadataError),
    (tuf_exceptions.DownloadLengthMismatchError, OversizedError),
    (tuf_exceptions.DownloadError, FetchError),
    (sslib_exceptions.UnverifiedSignatureError, SignatureError),
    (sslib_exceptions.KeyMismatchError, SigningKeyError),
    (sslib_exceptions.Error, MetadataError),
)


def error_for(exc: BaseException, what: str) -> SyncError:
    """The :mod:`fogline.sync` error for an upstream ``exc`` met while doing ``what``."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exceptions.DownloadHTTPError):
        return FetchError(f"{what}: HTTP {exc.status_code}: {detail}", status=exc.status_code)
    for upstream, ours in _MAP:
        if isinstance(exc, upstream):
            return ours(f"{what}: {detail}")
    if isinstance(exc, OSError):
        return StorageError(f"{what}: {exc.strerror or detail}")
    return MetadataError(f"{what}: {type(exc).__name__}: {detail}")


@contextlib.contextmanager
def tuf_errors(what: str) -> Iterator[None]:
    """Every python-tuf, securesystemslib and local-file error inside becomes ours."""
    try:
        yield
    except SyncError:
        raise
    except (
        tuf_exceptions.RepositoryError,
        tuf_exceptions.DownloadError,
        sslib_exceptions.Error,
        sslib_exceptions.KeyMismatchError,
        OSError,
    ) as exc:
        raise error_for(exc, what) from exc
