"""Errors of :mod:`fogline.cloud_service`.

One root, :class:`CloudError`, split in two: :class:`CloudDataError` for bad input (a
config file, a bundle name nobody serves) and :class:`CloudServiceError` for a part that
failed or is overloaded (the queue, a backend, the database, the broker). Callers catch
narrowly; nothing here knows about HTTP status codes.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BrokerError",
    "BundleNotReleasedError",
    "BundleSourceError",
    "CloudDataError",
    "CloudError",
    "CloudServiceError",
    "ConfigError",
    "DeadlineExceededError",
    "InferenceInputError",
    "ModelNotReadyError",
    "QueueFullError",
    "StoreCorruptError",
    "StoreError",
    "UnknownBundleError",
    "UnknownModelError",
]


class CloudError(Exception):
    """Root of every error raised by :mod:`fogline.cloud_service`."""


class CloudDataError(CloudError, ValueError):
    """The input is wrong: fixing it is the caller's job, retrying does not help."""


class ConfigError(CloudDataError):
    """The worker's configuration is invalid; the message names the offending key."""


class UnknownBundleError(CloudDataError, LookupError):
    """A message names a bundle this worker does not serve."""

    def __init__(self, bundle: str) -> None:
        super().__init__(f"unknown bundle {bundle!r}")
        self.bundle = bundle


class BundleNotReleasedError(UnknownBundleError):
    """A bundle source was asked for a bundle version its catalogue never released."""

    def __init__(self, bundle: str, catalogue: str = "the catalogue") -> None:
        super().__init__(bundle)
        self.args = (f"bundle {bundle!r} was never released in {catalogue}",)


class CloudServiceError(CloudError):
    """A part of the service failed or is overloaded; retrying later may succeed."""


class QueueFullError(CloudServiceError):
    """The batch queue is at its bound; the item was not accepted.

    ``retry_after_ms`` is the back-off the sender is asked to observe.
    """

    def __init__(self, depth: int, retry_after_ms: int) -> None:
        super().__init__(f"queue full ({depth} items waiting); retry after {retry_after_ms} ms")
        self.depth = depth
        self.retry_after_ms = retry_after_ms


class BackendError(CloudServiceError):
    """An inference backend could not be selected, built, loaded or run."""


class StoreError(CloudServiceError):
    """The result store could not be reached or refused a statement."""


class StoreCorruptError(StoreError):
    """The result store's database file is damaged (SQLite's integrity check found it so
    when the store was opened); the message names the file and what to do."""


class BundleSourceError(CloudServiceError):
    """A released bundle could not be had from its source: the catalogue's metadata or a
    stored file was refused (tampered, truncated, badly signed, expired) or could not be
    read, or the bundle could not be written to the cache. The message names the file."""


class BrokerError(CloudServiceError):
    """The MQTT broker could not be reached or used."""


class UnknownModelError(CloudDataError, LookupError):
    """A request names a model (or a version of it) that is not in the repository."""

    def __init__(self, model: str, version: str | None = None) -> None:
        what = f"model {model!r}" if version is None else f"version {version!r} of model {model!r}"
        super().__init__(f"unknown {what}")
        self.model = model
        self.version = version


class InferenceInputError(CloudDataError):
    """An inference request does not fit the model: a missing or unexpected tensor, a wrong
    datatype or shape, data that does not match its declared shape."""


class ModelNotReadyError(CloudServiceError):
    """The model exists but is loading, unloading or failed to load."""


class DeadlineExceededError(CloudServiceError):
    """A queued request could not be served within its timeout and was rejected unserved."""
