"""Errors of :mod:`fogline.sync`."""

from __future__ import annotations

__all__ = ["BundleError", "SyncError"]


class SyncError(Exception):
    """Root of every error raised by :mod:`fogline.sync`."""


class BundleError(SyncError, ValueError):
    """A bundle is malformed, incomplete, or its files do not match the manifest."""
