"""The catalogue (every released bundle) and the director (what each site should run).

Both are TUF repositories written by :class:`~fogline.sync._writer.RepositoryWriter`.
The catalogue's targets are signed by the release keys, which may stay offline between
releases; the director's by the rollout service's online key. A site installs a bundle
only when both agree (:mod:`fogline.sync._verify`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from fogline.compression import make_delta
from fogline.sync._bundle import Bundle
from fogline.sync._names import check_name
from fogline.sync._release import (
    MANIFEST,
    Platform,
    Release,
    delta_path,
    file_path,
    fogline_custom,
    manifest_path,
    site_path,
)
from fogline.sync._writer import RepositoryWriter
from fogline.sync.errors import MetadataError, PublishError

__all__ = ["DELTA_MAX_SHARE", "Catalogue", "DeltaTarget", "Director"]

# A delta is published only when it is at most this share of the file it rebuilds: a site
# that has to fetch most of the file anyway gains little from rebuilding it.
DELTA_MAX_SHARE = 0.8


@dataclass(frozen=True)
class DeltaTarget:
    """A published delta: it rebuilds ``file`` of ``bundle`` (``result_sha256``,
    ``result_length``) from the file whose SHA-256 is ``base_sha256``, in ``length``
    bytes; ``path`` is its catalogue target path."""

    path: str
    bundle: str
    file: str
    base_sha256: str
    result_sha256: str
    result_length: int
    length: int


def _hashed_name(path: str, sha256: str) -> str:
    """Where a target is stored: its directory, then ``<sha256>.<basename>`` (TUF's
    consistent-snapshot naming), so every stored artifact is named by its content."""
    parent, _, base = path.rpartition("/")
    return f"targets/{parent}/{sha256}.{base}"


class Catalogue:
    """The released bundles, as TUF targets: each release's manifest and model files."""

    def __init__(self, writer: RepositoryWriter) -> None:
        self.writer = writer

    def releases(self) -> list[Release]:
        """Every release, by name and then release counter."""
        out = []
        for path, entry in self.writer.targets().targets.items():
            custom = entry.custom
            if isinstance(custom, Mapping) and custom.get("fogline", {}).get("kind") == "bundle":
                out.append(_release_of(path, entry))
        return sorted(out, key=lambda r: (r.name, r.release))

    def get(self, name: str, version: str) -> Release | None:
        entry = self.writer.targets().targets.get(manifest_path(name, version))
        return None if entry is None else _release_of(entry.path, entry)

    def manifest(self, release: Release) -> dict[str, Any]:
        """The released manifest, as stored."""
        data = self.writer.store.read(_hashed_name(release.path, release.sha256))
        if data is None:
            raise MetadataError(f"the catalogue lacks the manifest of {release.id}")
        parsed: dict[str, Any] = json.loads(data)
        return parsed

    def deltas(self, release: Release) -> list[DeltaTarget]:
        """The deltas published with ``release``, by file and base."""
        out = []
        for path, entry in self.writer.targets().targets.items():
            custom = entry.custom.get("fogline") if isinstance(entry.custom, Mapping) else None
            if not isinstance(custom, Mapping) or custom.get("kind") != "delta":
                continue
            if custom.get("bundle") != release.id:
                continue
            out.append(
                DeltaTarget(
                    path=path,
                    bundle=release.id,
                    file=custom["file"],
                    base_sha256=custom["base"],
                    result_sha256=custom["result"],
                    result_length=custom["result_length"],
                    length=entry.length,
                )
            )
        return sorted(out, key=lambda d: (d.file, d.base_sha256))

    def _delta_bases(self, name: str, deltas: int) -> list[tuple[Release, dict[str, Any]]]:
        """The newest ``deltas`` releases of ``name`` with their manifests' files."""
        earlier = sorted((r for r in self.releases() if r.name == name), key=lambda r: -r.release)
        out = []
        for previous in earlier[:deltas]:
            files = self.manifest(previous).get("files")
            if isinstance(files, dict):
                out.append((previous, files))
        return out

    def _make_deltas(
        self,
        released: Release,
        fname: str,
        content: bytes,
        bases: Sequence[tuple[Release, Mapping[str, Any]]],
    ) -> dict[str, TargetFile]:
        """Deltas to ``content`` (``fname`` of ``released``) from the same-named file of each
        of ``bases``, stored; only those at most :data:`DELTA_MAX_SHARE` of the file."""
        sha256 = hashlib.sha256(content).hexdigest()
        entries: dict[str, TargetFile] = {}
        for previous, files in bases:
            info = files.get(fname)
            base_sha = info.get("sha256") if isinstance(info, dict) else None
            if not isinstance(base_sha, str) or base_sha == sha256:
                continue  # absent, or the same bytes: a site copies what it holds
            path = delta_path(released.name, released.version, fname, base_sha)
            if path in entries:
                continue
            old = self.writer.store.read(
                _hashed_name(file_path(previous.name, previous.version, fname), base_sha)
            )
            if old is None or hashlib.sha256(old).hexdigest() != base_sha:
                continue
            delta = make_delta(old, content)
            if len(delta) > DELTA_MAX_SHARE * len(content):
                continue
            delta_sha = hashlib.sha256(delta).hexdigest()
            self.writer.store.write(_hashed_name(path, delta_sha), delta)
            entries[path] = TargetFile(
                len(delta),
                {"sha256": delta_sha},
                path,
                {
                    "custom": {
                        "fogline": {
                            "kind": "delta",
                            "bundle": released.id,
                            "file": fname,
                            "base": base_sha,
                            "result": sha256,
                            "result_length": len(content),
                        }
                    }
                },
            )
        return entries

    def publish(
        self,
        bundle_dir: Path,
        *,
        name: str,
        version: str,
        platform: Platform,
        regions: Sequence[str],
        min_agent_version: str,
        release: int | None = None,
        signatures: Mapping[str, Any] | None = None,
        deltas: int = 1,
    ) -> Release:
        """Release the bundle in ``bundle_dir`` as ``name`` ``version``.

        The release counter must be strictly greater than every earlier release of
        ``name`` (by default it is one more than the highest); a released ``name``
        ``version`` is never replaced. The bundle's files are checked against its manifest
        first, then stored under their SHA-256 and listed in targets with the release's
        fields, and a new snapshot and timestamp are signed.

        Each file that differs from the same-named file of one of the ``deltas`` newest
        earlier releases of ``name`` also gets a delta from it (:func:`make_delta`), its
        own target (``kind: delta``), when the delta is at most :data:`DELTA_MAX_SHARE`
        of the file; ``deltas=0`` publishes none.
        """
        if isinstance(deltas, bool) or not isinstance(deltas, int) or deltas < 0:
            raise PublishError(f"deltas must be an integer >= 0, got {deltas!r}")
        try:
            check_name(name, "bundle name")
            check_name(version, "bundle version")
        except ValueError as exc:
            raise PublishError(str(exc)) from None
        if self.get(name, version) is not None:
            raise PublishError(f"{name}@{version} is already released; releases are immutable")
        highest = max((r.release for r in self.releases() if r.name == name), default=0)
        counter = highest + 1 if release is None else release
        if counter <= highest:
            raise PublishError(
                f"release counter {counter} of {name!r} must be greater than {highest}, "
                "the highest released so far"
            )
        bundle = Bundle.load(bundle_dir)
        manifest = {k: v for k, v in bundle.manifest.items() if k != "release"}
        manifest["name"] = name
        manifest["version"] = version
        manifest["release"] = {
            "counter": counter,
            "platform": platform.to_dict(),
            "regions": list(regions),
            "min_agent_version": min_agent_version,
        }
        if signatures is not None:
            manifest["signatures"] = dict(signatures)
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        try:
            released = Release(
                name=name,
                version=version,
                release=counter,
                platform=platform,
                regions=tuple(regions),
                min_agent_version=min_agent_version,
                length=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        except (TypeError, ValueError) as exc:
            raise PublishError(str(exc)) from None
        entries: dict[str, TargetFile] = {}
        bases = self._delta_bases(name, deltas) if deltas else []
        for fname, info in sorted(bundle.manifest["files"].items()):
            try:
                path = file_path(name, version, fname)
            except ValueError as exc:
                raise PublishError(str(exc)) from None
            if fname == MANIFEST:
                raise PublishError(f"a bundle file may not be named {MANIFEST}")
            content = (bundle.root / fname).read_bytes()
            sha256 = hashlib.sha256(content).hexdigest()
            if sha256 != info["sha256"]:
                raise PublishError(f"{fname} changed while it was being released")
            self.writer.store.write(_hashed_name(path, sha256), content)
            entries[path] = TargetFile(
                len(content),
                {"sha256": sha256},
                path,
                {"custom": {"fogline": {"kind": "file", "bundle": released.id}}},
            )
            entries.update(self._make_deltas(released, fname, content, bases))
        self.writer.store.write(_hashed_name(released.path, released.sha256), data)
        entries[released.path] = TargetFile(
            released.length,
            {"sha256": released.sha256},
            released.path,
            {"custom": {"fogline": {"kind": "bundle", **released.fields()}}},
        )
        with self.writer.edit_targets() as targets:
            targets.targets.update(entries)
        self.writer.commit()
        return released


def _release_of(path: str, entry: TargetFile) -> Release:
    custom = fogline_custom(entry.custom, "bundle", f"catalogue entry {path!r}")
    return Release.from_fields(custom, length=entry.length, sha256=entry.hashes["sha256"])


class Director:
    """Per-site desired state: which release each site should run.

    A site's entry is the target ``sites/<site>`` in the hash bin its path falls in; it
    carries the manifest's length and hashes and the release's fields, which the site
    compares with the catalogue's.
    """

    def __init__(self, writer: RepositoryWriter) -> None:
        self.writer = writer

    def _bin(self, path: str) -> str:
        bins = self.writer.bins()
        if bins is None:
            raise MetadataError(f"{self.writer.name} has no site bins: not a director")
        return bins.get_role_for_target(path)

    def assign(self, sites: Iterable[str], release: Release) -> None:
        """Have every site of ``sites`` run ``release``: each touched bin is re-signed
        once, then one snapshot and timestamp."""
        self.apply([(release, sites)])

    def unassign(self, sites: Iterable[str]) -> None:
        """Remove the desired state of ``sites`` (they keep what they run)."""
        self.apply(unassign=sites)

    def apply(
        self,
        assign: Iterable[tuple[Release, Iterable[str]]] = (),
        unassign: Iterable[str] = (),
    ) -> None:
        """Several releases for several groups of sites, and sites to unassign, in one
        signing: each touched bin once, then one snapshot and timestamp (a rollout's tick
        that rolls some sites forward and others back)."""
        by_bin: dict[str, dict[str, Release | None]] = defaultdict(dict)
        for release, sites in [*assign, (None, unassign)]:
            for site in sites:
                try:
                    path = site_path(site)
                except ValueError as exc:
                    raise PublishError(str(exc)) from None
                by_bin[self._bin(path)][site] = release
        if not by_bin:
            return
        for bin_name, members in sorted(by_bin.items()):
            with self.writer.edit_targets(bin_name) as targets:
                for site, chosen in members.items():
                    path = site_path(site)
                    if chosen is None:
                        targets.targets.pop(path, None)
                        continue
                    targets.targets[path] = TargetFile(
                        chosen.length,
                        {"sha256": chosen.sha256},
                        path,
                        {
                            "custom": {
                                "fogline": {
                                    "kind": "desired",
                                    "site": site,
                                    "target": chosen.path,
                                    **chosen.fields(),
                                }
                            }
                        },
                    )
        self.writer.commit()

    def desired(self, site: str) -> Release | None:
        """The release ``site`` is told to run, if any."""
        path = site_path(site)
        entry = self.writer.targets(self._bin(path)).targets.get(path)
        if entry is None:
            return None
        custom = fogline_custom(entry.custom, "desired", f"director entry {path!r}")
        return Release.from_fields(custom, length=entry.length, sha256=entry.hashes["sha256"])
