"""The installed fogline version, read from the distribution's metadata.

The component does not import the top-level ``fogline`` package (the CLI's floor) for it.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

__all__ = ["fogline_version"]


@functools.cache
def fogline_version() -> str:
    """The version of the installed ``fogline`` distribution (``0+unknown`` when the code
    runs from a tree that was never installed, so there is no metadata to read)."""
    try:
        return version("fogline")
    except PackageNotFoundError:
        return "0+unknown"
