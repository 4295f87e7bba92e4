"""The site's decision, from what the two repositories verified. No I/O.

python-tuf verifies each repository's metadata on its own (signatures, thresholds,
versions, expiry, the snapshot's and timestamp's pins). What makes the two agree is here,
as Uptane has it for a director and an image repository:

1. The director's entry for the site (``sites/<site>``) names the site and a catalogue
   target path; the path must be safe (:func:`read_desired`).
2. The catalogue must list that target: a director cannot install what was never released
   (:class:`NotReleasedError`).
3. Both entries must agree on the length and every hash, and on the fields that must
   match — name, version, release counter, platform, allowed regions, minimum agent
   version (:class:`DisagreementError` names the field).
4. The release must suit the site: its region allowed, its platform present, its agent new
   enough, its release counter not lower than the one the site installed of that name —
   unless it is exactly the bundle the site ran immediately before (same name, version and
   manifest SHA-256: a rollback, :attr:`SiteState.previous`).
5. The manifest (downloaded against the catalogue's hashes) must state the same release,
   and each model file it names must be listed by the catalogue with the same length and
   SHA-256 (:func:`manifest_files`, :func:`check_file`). A site downloads only what it
   runs, the edge model (:func:`site_files`); the cloud loads its cloud model
   (:func:`cloud_files`).
6. A delta is used only when the catalogue lists it for this release, this file and a
   base the site holds, rebuilding exactly the signed length and SHA-256
   (:func:`check_delta`); the rebuilt file is checked against them again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tuf.api.metadata import TargetFile

from fogline.sync._names import (
    ANY_REGION,
    check_name,
    check_target_path,
    parse_version,
    version_at_least,
)
from fogline.sync._release import (
    MANIFEST,
    Release,
    fogline_custom,
    manifest_path,
)
from fogline.sync.errors import (
    AgentVersionError,
    DisagreementError,
    MetadataError,
    NotReleasedError,
    PlatformError,
    RegionError,
    ReleaseRollbackError,
    TamperedError,
    UnsafePathError,
    WrongSiteError,
)

__all__ = [
    "Decision",
    "DesiredState",
    "FileEntry",
    "RanBundle",
    "SiteState",
    "check_delta",
    "check_file",
    "cloud_files",
    "decide",
    "manifest_files",
    "read_desired",
    "site_files",
]

_COMPARED_FIELDS = ("name", "version", "release", "platform", "regions", "min_agent_version")
_MAX_MANIFEST_FILES = 64


@dataclass(frozen=True)
class RanBundle:
    """A bundle a site ran: its version, release counter and manifest SHA-256 (the name is
    the key it is filed under)."""

    version: str
    release: int
    sha256: str

    def __post_init__(self) -> None:
        check_name(self.version, "bundle version")
        if isinstance(self.release, bool) or not isinstance(self.release, int):
            raise TypeError(f"release counter must be an integer, got {self.release!r}")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64:
            raise ValueError("sha256 must be 64 hex digits")

    @classmethod
    def of(cls, release: Release) -> RanBundle:
        return cls(version=release.version, release=release.release, sha256=release.sha256)

    def is_release(self, release: Release) -> bool:
        return (self.version, self.release, self.sha256) == (
            release.version,
            release.release,
            release.sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "release": self.release, "sha256": self.sha256}


@dataclass(frozen=True)
class SiteState:
    """What the site is: its name and region, its agent and onnxruntime versions, the
    execution providers it has, and the highest release counter it installed per bundle
    name (``releases``), which a new bundle must not go below. ``running`` is the bundle it
    runs and ``previous`` the one it ran immediately before, per name: the one bundle
    with a lower counter it goes back to (a rollback)."""

    site: str
    region: str
    agent_version: str
    onnxruntime: str
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    releases: Mapping[str, int] = field(default_factory=dict)
    running: Mapping[str, RanBundle] = field(default_factory=dict)
    previous: Mapping[str, RanBundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.site, "site")
        check_name(self.region, "region")
        parse_version(self.agent_version, "agent version")
        parse_version(self.onnxruntime, "onnxruntime version")
        if not isinstance(self.execution_providers, tuple) or not self.execution_providers:
            raise ValueError("execution_providers must be a non-empty tuple")
        releases = dict(self.releases)
        for name, counter in releases.items():
            check_name(name, "bundle name")
            if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
                raise ValueError(f"installed release of {name!r} must be an integer >= 0")
        object.__setattr__(self, "releases", MappingProxyType(releases))
        for what in ("running", "previous"):
            ran = dict(getattr(self, what))
            for name, bundle in ran.items():
                check_name(name, "bundle name")
                if not isinstance(bundle, RanBundle):
                    raise TypeError(f"{what} bundle of {name!r} must be a RanBundle")
            object.__setattr__(self, what, MappingProxyType(ran))


@dataclass(frozen=True)
class DesiredState:
    """The director's word for one site: the catalogue target to run and what it claims
    of it (length, hashes and the release fields)."""

    site: str
    target: str
    length: int
    hashes: Mapping[str, str]
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """A release both repositories agree on and the site may run. ``installed`` is true
    when the site already runs this release; ``rollback`` when it is the bundle the site
    ran before, with a lower release counter than the highest it installed."""

    site: str
    release: Release
    installed: bool
    rollback: bool = False

    @property
    def target(self) -> str:
        return self.release.path


@dataclass(frozen=True)
class FileEntry:
    """A model file as the released manifest names it."""

    name: str
    length: int
    sha256: str


def read_desired(site: str, entry: TargetFile | None) -> DesiredState | None:
    """The director's entry for ``site`` (looked up at ``sites/<site>``), checked to name
    this site and a safe catalogue path; ``None`` when the director has none."""
    if entry is None:
        return None
    custom = fogline_custom(entry.custom, "desired", f"director entry {entry.path!r}")
    named = custom.get("site")
    if named != site:
        raise WrongSiteError(f"the director's entry for site {site!r} names site {named!r}")
    target = check_target_path(custom.get("target"))
    fields = {k: custom.get(k) for k in _COMPARED_FIELDS}
    return DesiredState(
        site=site,
        target=target,
        length=entry.length,
        hashes=dict(entry.hashes),
        fields=fields,
    )


def decide(state: SiteState, desired: DesiredState, entry: TargetFile | None) -> Decision:
    """Check the catalogue's ``entry`` for ``desired.target`` against the director's word
    and against the site; the verified release, or a :class:`VerificationError`."""
    if desired.site != state.site:
        raise WrongSiteError(f"desired state of site {desired.site!r} read by {state.site!r}")
    if entry is None:
        raise NotReleasedError(
            f"the director names {desired.target!r}, which the catalogue never released"
        )
    if entry.path != desired.target:
        raise MetadataError(f"catalogue answered {entry.path!r} for {desired.target!r}")
    custom = fogline_custom(entry.custom, "bundle", f"catalogue entry {entry.path!r}")
    if "sha256" not in entry.hashes:
        raise MetadataError(f"catalogue entry {entry.path!r} has no sha256 hash")
    release = Release.from_fields(custom, length=entry.length, sha256=entry.hashes["sha256"])
    if manifest_path(release.name, release.version) != entry.path:
        raise MetadataError(
            f"catalogue entry {entry.path!r} describes {release.id}, which lives elsewhere"
        )
    # Uptane: length and hashes equal in both repositories.
    if desired.length != entry.length:
        raise DisagreementError(
            "length", f"director {desired.length} bytes, catalogue {entry.length} bytes"
        )
    if dict(desired.hashes) != dict(entry.hashes):
        raise DisagreementError("hashes", f"for {entry.path!r}")
    released = release.fields()
    for name in _COMPARED_FIELDS:
        if desired.fields.get(name) != released[name]:
            raise DisagreementError(
                name, f"director {desired.fields.get(name)!r}, catalogue {released[name]!r}"
            )
    _suits_site(state, release)
    installed = state.releases.get(release.name, 0)
    running = state.running.get(release.name)
    previous = state.previous.get(release.name)
    # Uptane: the release counter does not go down — except back to exactly the bundle the
    # site ran immediately before (a rollout rolled back). A director key alone can then
    # flip a site between its current and previous bundle, both released and both verified
    # on this site, never to any older one. The bundle it runs now (after such a
    # rollback, one below the counter installed) is what it has: nothing is installed.
    rollback = False
    runs_it = running is not None and running.is_release(release)
    if release.release < installed and not runs_it:
        if previous is None or not previous.is_release(release):
            raise ReleaseRollbackError(
                f"{release.id} has release counter {release.release}, lower than the "
                f"installed {installed} of {release.name!r}, and is not the bundle the site "
                "ran before"
            )
        rollback = True
    same = runs_it if running is not None else release.release == installed
    return Decision(site=state.site, release=release, installed=same, rollback=rollback)


def _suits_site(state: SiteState, release: Release) -> None:
    if ANY_REGION not in release.regions and state.region not in release.regions:
        raise RegionError(
            f"{release.id} is allowed in {', '.join(release.regions)}, not in {state.region!r}"
        )
    if not version_at_least(state.onnxruntime, release.platform.onnxruntime):
        raise PlatformError(
            f"{release.id} needs onnxruntime {release.platform.onnxruntime} or newer; "
            f"the site has {state.onnxruntime}"
        )
    if release.platform.execution_provider not in state.execution_providers:
        raise PlatformError(
            f"{release.id} runs on {release.platform.execution_provider}; the site has "
            f"{', '.join(state.execution_providers)}"
        )
    if not version_at_least(state.agent_version, release.min_agent_version):
        raise AgentVersionError(
            f"{release.id} needs agent {release.min_agent_version} or newer; "
            f"the site runs {state.agent_version}"
        )


def manifest_files(data: bytes, release: Release) -> dict[str, FileEntry]:
    """The model files of a released manifest (``data``, already checked against the
    catalogue's hashes), after checking it states ``release`` itself."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MetadataError(f"the manifest of {release.id} is not JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise MetadataError(f"the manifest of {release.id} is not a JSON object")
    stated = manifest.get("release")
    if not isinstance(stated, dict):
        raise MetadataError(f"the manifest of {release.id} has no release block")
    try:
        own = Release.from_fields(
            {
                "name": manifest.get("name"),
                "version": manifest.get("version"),
                "release": stated.get("counter"),
                "platform": stated.get("platform"),
                "regions": stated.get("regions"),
                "min_agent_version": stated.get("min_agent_version"),
            },
            length=release.length,
            sha256=release.sha256,
        )
    except MetadataError as exc:
        raise MetadataError(f"the manifest of {release.id}: {exc}") from None
    if own != release:
        raise DisagreementError("manifest", f"the manifest states {own.fields()}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not 1 <= len(files) <= _MAX_MANIFEST_FILES:
        raise MetadataError(f"the manifest of {release.id} must list 1 to 64 files")
    out: dict[str, FileEntry] = {}
    for name, info in files.items():
        if name == MANIFEST or "/" in name:
            raise UnsafePathError(f"the manifest of {release.id} names file {name!r}")
        check_target_path(name)
        if not isinstance(info, dict):
            raise MetadataError(f"the manifest entry of {name!r} is not an object")
        length, sha256 = info.get("bytes"), info.get("sha256")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise MetadataError(f"the manifest entry of {name!r} has no valid byte count")
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise MetadataError(f"the manifest entry of {name!r} has no valid sha256")
        out[name] = FileEntry(name=name, length=length, sha256=sha256)
    return out


def check_file(release: Release, file: FileEntry, entry: TargetFile | None) -> TargetFile:
    """The catalogue's entry for one model file, checked to be listed and to agree with the
    manifest; it is what the download is verified against."""
    if entry is None:
        raise NotReleasedError(f"{release.id} names {file.name!r}, which the catalogue lacks")
    custom = fogline_custom(entry.custom, "file", f"catalogue entry {entry.path!r}")
    if custom.get("bundle") != release.id:
        raise MetadataError(f"catalogue entry {entry.path!r} belongs to {custom.get('bundle')!r}")
    if entry.length != file.length or entry.hashes.get("sha256") != file.sha256:
        raise TamperedError(
            f"{release.id}: {file.name} differs between the manifest and the catalogue"
        )
    return entry


def site_files(data: bytes, release: Release, files: Mapping[str, FileEntry]) -> frozenset[str]:
    """The files of a released manifest (``data``) a site downloads: the edge model it
    runs. The cloud part and any extra models stay in the catalogue; the site knows their
    hashes from the signed manifest (``files``)."""
    manifest = json.loads(data)
    edge = manifest.get("edge") if isinstance(manifest, dict) else None
    model = edge.get("model") if isinstance(edge, dict) else None
    if not isinstance(model, str) or model not in files:
        raise MetadataError(f"the manifest of {release.id} names no edge model among its files")
    return frozenset({model})


def cloud_files(data: bytes, release: Release, files: Mapping[str, FileEntry]) -> frozenset[str]:
    """The files of a released manifest (``data``) the cloud loads: the cloud model it
    serves (the edge model and any extra models stay in the catalogue)."""
    manifest = json.loads(data)
    cloud = manifest.get("cloud") if isinstance(manifest, dict) else None
    model = cloud.get("model") if isinstance(cloud, dict) else None
    if not isinstance(model, str) or model not in files:
        raise MetadataError(f"the manifest of {release.id} names no cloud model among its files")
    return frozenset({model})


def check_delta(
    release: Release, file: FileEntry, base_sha256: str, entry: TargetFile | None
) -> TargetFile | None:
    """The catalogue's entry for a delta to ``file`` from ``base_sha256``, checked to be a
    delta of this release and file, from that base, to the signed length and SHA-256, and
    smaller than the file; ``None`` when the catalogue lists none."""
    if entry is None:
        return None
    custom = fogline_custom(entry.custom, "delta", f"catalogue entry {entry.path!r}")
    expected = {
        "bundle": release.id,
        "file": file.name,
        "base": base_sha256,
        "result": file.sha256,
        "result_length": file.length,
    }
    for key, value in expected.items():
        if custom.get(key) != value:
            raise MetadataError(
                f"catalogue entry {entry.path!r} says {key} {custom.get(key)!r}, not {value!r}"
            )
    if "sha256" not in entry.hashes or entry.length >= file.length:
        raise MetadataError(f"catalogue entry {entry.path!r} is no smaller than its file")
    return entry
