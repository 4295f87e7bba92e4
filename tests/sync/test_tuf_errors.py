"""Every python-tuf and securesystemslib error becomes a fogline.sync error, bad data as
bad data and transport as transport."""

from __future__ import annotations

import inspect

import pytest
import securesystemslib.exceptions as sslib_exceptions
import tuf.api.exceptions as tuf_exceptions
from tuf.api import serialization

from fogline.sync import (
    ExpiredError,
    FetchError,
    MetadataVersionError,
    OversizedError,
    SignatureError,
    StorageError,
    SyncError,
    TamperedError,
    VerificationError,
)
from fogline.sync._tuf_errors import error_for, tuf_errors


def upstream_classes() -> list[type[BaseException]]:
    found = []
    for module in (tuf_exceptions, sslib_exceptions, serialization):
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__.startswith(
                ("tuf", "securesystemslib")
            ):
                found.append(obj)
    return sorted(set(found), key=lambda c: c.__qualname__)


def make(cls: type[BaseException]) -> BaseException:
    if cls is tuf_exceptions.DownloadHTTPError:
        return cls("gone", 404)
    return cls("boom")


@pytest.mark.parametrize("cls", upstream_classes(), ids=lambda c: c.__qualname__)
def test_every_upstream_error_is_mapped(cls: type[BaseException]) -> None:
    with pytest.raises(SyncError) as exc, tuf_errors("doing it"):
        raise make(cls)
    assert str(exc.value).startswith("doing it: ")
    assert exc.value.__cause__ is not None


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        (tuf_exceptions.UnsignedMetadataError("x"), SignatureError),
        (tuf_exceptions.BadVersionNumberError("x"), MetadataVersionError),
        (tuf_exceptions.EqualVersionNumberError("x"), MetadataVersionError),
        (tuf_exceptions.ExpiredMetadataError("x"), ExpiredError),
        (tuf_exceptions.LengthOrHashMismatchError("x"), TamperedError),
        (tuf_exceptions.DownloadLengthMismatchError("x"), OversizedError),
        (tuf_exceptions.SlowRetrievalError("x"), FetchError),
        (tuf_exceptions.DownloadError("x"), FetchError),
        (serialization.DeserializationError("x"), VerificationError),
        (sslib_exceptions.StorageError("x"), StorageError),
        (PermissionError(13, "Permission denied"), StorageError),
    ],
)
def test_each_kind_keeps_its_meaning(upstream: BaseException, ours: type[SyncError]) -> None:
    assert isinstance(error_for(upstream, "x"), ours)


def test_an_http_error_keeps_its_status() -> None:
    err = error_for(tuf_exceptions.DownloadHTTPError("nope", 503), "fetching")
    assert isinstance(err, FetchError)
    assert err.status == 503
    assert "HTTP 503" in str(err)


def test_bad_data_is_not_transport() -> None:
    for err in (
        error_for(tuf_exceptions.RepositoryError("x"), "x"),
        error_for(tuf_exceptions.DownloadLengthMismatchError("x"), "x"),
    ):
        assert isinstance(err, VerificationError)
        assert not isinstance(err, FetchError)
