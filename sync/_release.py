"""What a release is, and how it is written into TUF targets metadata. No I/O.

The catalogue lists each release as targets under ``<name>/<version>/``: the released
``manifest.json`` (its hash identifies the release) and every model file the manifest
names. The manifest's target entry carries the release's fields in ``custom``::

    "custom": {"fogline": {
        "kind": "bundle", "name": "reference", "version": "3", "release": 3,
        "platform": {"onnxruntime": "1.32", "execution_provider": "CPUExecutionProvider"},
        "regions": ["eu-west"], "min_agent_version": "0.1.0"}}

A model file's entry carries ``{"fogline": {"kind": "file", "bundle": "reference@3"}}``.
A delta that rebuilds one from a file of an earlier release is its own target,
``<name>/<version>/deltas/<base sha256>/<file>``, with ``{"fogline": {"kind": "delta",
"bundle": "reference@3", "file": "edge.onnx", "base": <sha256 of the old file>,
"result": <sha256 of the file>, "result_length": <its length>}}``.
The director's entry for a site, ``sites/<site>``, has the manifest's length and hashes
and the same fields, plus ``"site"`` and ``"target"`` (the manifest's catalogue path).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fogline.sync._names import ANY_REGION, check_name, parse_version
from fogline.sync.errors import MetadataError

__all__ = [
    "MANIFEST",
    "Platform",
    "Release",
    "delta_path",
    "file_path",
    "manifest_path",
    "site_path",
]

MANIFEST = "manifest.json"
SITES_PREFIX = "sites"
_MAX_REGIONS = 64
_MAX_RELEASE = 2**63 - 1


def manifest_path(name: str, version: str) -> str:
    """The catalogue target path of a release's manifest."""
    return f"{check_name(name, 'bundle name')}/{check_name(version, 'bundle version')}/{MANIFEST}"


def file_path(name: str, version: str, filename: str) -> str:
    """The catalogue target path of one model file of a release."""
    return f"{name}/{version}/{check_name(filename, 'bundle file name')}"


def delta_path(name: str, version: str, filename: str, base_sha256: str) -> str:
    """The catalogue target path of a delta that rebuilds ``filename`` of a release from
    the file whose SHA-256 is ``base_sha256``."""
    if len(base_sha256) != 64 or base_sha256.strip("0123456789abcdef"):
        raise ValueError("a delta's base must be a sha256 in lowercase hex")
    return f"{name}/{version}/deltas/{base_sha256}/{check_name(filename, 'bundle file name')}"


def site_path(site: str) -> str:
    """The director target path that holds a site's desired state."""
    return f"{SITES_PREFIX}/{check_name(site, 'site')}"


@dataclass(frozen=True)
class Platform:
    """What a bundle needs to run: onnxruntime at least ``onnxruntime``, and the execution
    provider ``execution_provider`` (``CPUExecutionProvider``, ``CUDAExecutionProvider``…)."""

    onnxruntime: str
    execution_provider: str = "CPUExecutionProvider"

    def __post_init__(self) -> None:
        parse_version(self.onnxruntime, "platform onnxruntime version")
        check_name(self.execution_provider, "execution provider")

    def to_dict(self) -> dict[str, str]:
        return {"onnxruntime": self.onnxruntime, "execution_provider": self.execution_provider}

    @classmethod
    def from_dict(cls, data: object) -> Platform:
        if not isinstance(data, Mapping) or set(data) != {"onnxruntime", "execution_provider"}:
            raise ValueError("platform must hold exactly onnxruntime and execution_provider")
        return cls(onnxruntime=data["onnxruntime"], execution_provider=data["execution_provider"])

    def __str__(self) -> str:
        return f"onnxruntime>={self.onnxruntime}/{self.execution_provider}"


@dataclass(frozen=True)
class Release:
    """One released bundle as the catalogue lists it: its fields, and the length and
    SHA-256 of its manifest (the manifest's hash identifies the release)."""

    name: str
    version: str
    release: int
    platform: Platform
    regions: tuple[str, ...]
    min_agent_version: str
    length: int
    sha256: str

    def __post_init__(self) -> None:
        check_name(self.name, "bundle name")
        check_name(self.version, "bundle version")
        if isinstance(self.release, bool) or not isinstance(self.release, int):
            raise TypeError(f"release counter must be an integer, got {self.release!r}")
        if not 1 <= self.release <= _MAX_RELEASE:
            raise ValueError(f"release counter {self.release} must lie in [1, 2^63-1]")
        if not isinstance(self.platform, Platform):
            raise TypeError("platform must be a Platform")
        if not isinstance(self.regions, tuple) or not 1 <= len(self.regions) <= _MAX_REGIONS:
            raise ValueError(f"regions must be a tuple of 1 to {_MAX_REGIONS} region names")
        for region in self.regions:
            if region != ANY_REGION:
                check_name(region, "region")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions {list(self.regions)} name one region twice")
        parse_version(self.min_agent_version, "min_agent_version")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f"length must be a non-negative integer, got {self.length!r}")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64:
            raise ValueError("sha256 must be 64 hex digits")
        int(self.sha256, 16)

    @property
    def id(self) -> str:
        """``name@version``, as feature messages name the bundle."""
        return f"{self.name}@{self.version}"

    @property
    def path(self) -> str:
        """The manifest's catalogue target path."""
        return manifest_path(self.name, self.version)

    def fields(self) -> dict[str, Any]:
        """The fields both repositories carry and the site compares."""
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "platform": self.platform.to_dict(),
            "regions": list(self.regions),
            "min_agent_version": self.min_agent_version,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.fields(), "length": self.length, "sha256": self.sha256}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], *, length: int, sha256: str) -> Release:
        """A release from the ``fields()`` of a repository entry; :class:`MetadataError`
        names what is wrong with remote data."""
        try:
            return cls(
                name=fields["name"],
                version=fields["version"],
                release=fields["release"],
                platform=Platform.from_dict(fields["platform"]),
                regions=tuple(_str_list(fields["regions"], "regions")),
                min_agent_version=fields["min_agent_version"],
                length=length,
                sha256=sha256,
            )
        except KeyError as exc:
            raise MetadataError(f"release fields lack {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"release fields are invalid: {exc}") from exc


def _str_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def fogline_custom(custom: object, kind: str, where: str) -> Mapping[str, Any]:
    """The ``custom.fogline`` object of a target entry, checked to be of ``kind``."""
    inner = custom.get("fogline") if isinstance(custom, Mapping) else None
    if not isinstance(inner, Mapping):
        raise MetadataError(f"{where} has no fogline custom fields")
    if inner.get("kind") != kind:
        raise MetadataError(f"{where} is a {inner.get('kind')!r} entry, not a {kind!r} one")
    return inner
