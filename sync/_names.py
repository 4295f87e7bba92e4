"""Names that become paths, and the version numbers that are compared. No I/O.

Bundle names, versions, sites and regions end up in target paths (``<name>/<version>/…``,
``sites/<site>``) and in local directory names, so each is one plain path segment. A target
path from a repository is checked segment by segment before it is looked up, fetched or
joined to a local directory: nothing absolute, no ``..``, no empty or dot-led segment, no
backslash, drive letter or percent escape.
"""

from __future__ import annotations

import re

from fogline.sync.errors import UnsafePathError

__all__ = [
    "ANY_REGION",
    "check_name",
    "check_target_path",
    "parse_version",
    "version_at_least",
]

ANY_REGION = "*"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_PATH_CHARS = 512
_MAX_DEPTH = 8
_VERSION = re.compile(r"\d{1,9}(?:\.\d{1,9}){0,7}")


def check_name(value: object, what: str) -> str:
    """``value`` if it is one plain path segment (letters, digits, ``.``, ``_``, ``-``; not
    led by a dot or dash), else ``ValueError`` naming ``what``."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_target_path(path: object) -> str:
    """``path`` if it is a safe relative target path, else :class:`UnsafePathError`."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"target path {path!r} is not a non-empty string")
    if len(path) > _MAX_PATH_CHARS:
        raise UnsafePathError(f"target path of {len(path)} characters is too long")
    segments = path.split("/")
    if len(segments) > _MAX_DEPTH:
        raise UnsafePathError(f"target path {path!r} is nested too deep")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise UnsafePathError(
                f"target path {path!r} has an unsafe segment {segment!r} (absolute, '..', "
                "empty, dot-led or with characters other than letters, digits, '.', '_', '-')"
            )
    return path


def parse_version(value: object, what: str) -> tuple[int, ...]:
    """A dotted version (``1.32.0``) as integers; a local part after ``+`` is ignored.

    The versions compared here (onnxruntime's, the agent's) are plain release numbers, so
    a PEP 440 parser (``packaging``, not a dependency of every extra that verifies) would
    only add a dependency; anything else is refused with ``ValueError``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a version string, got {value!r}")
    release = value.split("+", 1)[0]
    if not _VERSION.fullmatch(release):
        raise ValueError(f"{what} {value!r} is not a dotted version such as 1.32.0")
    parts = [int(p) for p in release.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def version_at_least(have: str, need: str) -> bool:
    """Whether version ``have`` is ``need`` or newer (``1.32`` equals ``1.32.0``)."""
    return parse_version(have, "version") >= parse_version(need, "version")
