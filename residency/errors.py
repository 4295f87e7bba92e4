"""Errors of :mod:`fogline.residency`."""

from __future__ import annotations

__all__ = ["ResidencyError"]


class ResidencyError(Exception):
    """Root of every error raised by :mod:`fogline.residency`."""
