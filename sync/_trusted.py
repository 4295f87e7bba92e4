"""A repository read where it is stored, verified as a TUF client verifies it.

:class:`SiteSync` verifies a repository through python-tuf's ``Updater``, which looks
targets up one path at a time. A part of the service that runs beside the repositories
(the cloud, loading the cloud part of any released bundle; a view of every site's desired
state) needs the whole listing, so :func:`trusted_targets` walks the TUF client workflow
over a :class:`~fogline.sync._store.Store` with python-tuf's metadata API:

1. Root (spec 5.3): start from a trusted root (by default the repository's own first root,
   ``metadata/1.root.json``: give the provisioned one to pin the anchor elsewhere), and
   load every newer ``<v>.root.json`` in turn, each signed by the threshold of the root
   before it and of itself, with exactly the next version.
2. Timestamp (5.4): signed by the root's timestamp keys.
3. Snapshot (5.5): the version the timestamp names, with its length and hashes if given,
   signed by the snapshot keys.
4. Targets (5.6): the version the snapshot names, signed by the targets keys; and each
   succinct hash bin it delegates (the director's sites), at the version the snapshot
   names, signed by the delegated keys, listing only paths that fall in that bin.
5. Every role is checked against expiry at ``now`` (the wall clock unless given).

Stored target files are read back by their content name (``targets/<dir>/<sha256>.<base>``)
and checked against the signed length and SHA-256 before anything uses them
(:meth:`TrustedTargets.read`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from fogline.sync._catalogue import _hashed_name
from fogline.sync._release import SITES_PREFIX, Release, fogline_custom, manifest_path
from fogline.sync._store import Store
from fogline.sync._tuf_errors import tuf_errors
from fogline.sync._verify import read_desired
from fogline.sync.errors import (
    ExpiredError,
    MetadataError,
    MetadataVersionError,
    StorageError,
    TamperedError,
)

__all__ = ["TrustedTargets", "trusted_targets"]

_MAX_ROOT_ROTATIONS = 256


@dataclass(frozen=True)
class TrustedTargets:
    """Every target a repository's verified metadata lists (top-level targets and site
    bins), by path; ``expires`` is the earliest expiry among the roles read."""

    name: str
    store: Store
    targets: Mapping[str, TargetFile]
    expires: datetime

    def get(self, path: str) -> TargetFile | None:
        return self.targets.get(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def read(self, entry: TargetFile) -> bytes:
        """The stored bytes of a listed target, checked against its signed length and
        SHA-256: :class:`TamperedError` (naming the stored file) when they differ,
        :class:`StorageError` when the file is missing."""
        sha256 = entry.hashes.get("sha256")
        if sha256 is None:
            raise MetadataError(f"{self.name}: target {entry.path!r} has no sha256 hash")
        stored = _hashed_name(entry.path, sha256)
        data = self.store.read(stored)
        if data is None:
            raise StorageError(f"{self.name}: {stored} (target {entry.path!r}) is missing")
        try:
            entry.verify_length_and_hashes(data)
        except tuf_exceptions.LengthOrHashMismatchError:
            raise TamperedError(
                f"{self.name}: {stored} does not match the signed length and SHA-256 of "
                f"{entry.path!r} ({len(data)} bytes stored, {entry.length} signed)"
            ) from None
        return data

    def release(self, name: str, version: str) -> Release | None:
        """The release ``name@version`` as a catalogue lists it, or None if never released."""
        entry = self.targets.get(manifest_path(name, version))
        if entry is None:
            return None
        custom = fogline_custom(entry.custom, "bundle", f"{self.name} entry {entry.path!r}")
        if "sha256" not in entry.hashes:
            raise MetadataError(f"{self.name} entry {entry.path!r} has no sha256 hash")
        release = Release.from_fields(custom, length=entry.length, sha256=entry.hashes["sha256"])
        if release.path != entry.path:
            raise MetadataError(
                f"{self.name} entry {entry.path!r} describes {release.id}, which lives elsewhere"
            )
        return release

    def desired(self) -> dict[str, Release]:
        """Each site's desired release as a director lists it (``sites/<site>``)."""
        out: dict[str, Release] = {}
        prefix = f"{SITES_PREFIX}/"
        for path, entry in self.targets.items():
            if not path.startswith(prefix):
                continue
            site = path[len(prefix) :]
            desired = read_desired(site, entry)
            if desired is None:  # pragma: no cover - read_desired answers None for None only
                continue
            out[site] = Release.from_fields(
                desired.fields, length=desired.length, sha256=desired.hashes.get("sha256", "")
            )
        return out


def trusted_targets(
    store: Store,
    *,
    name: str = "repository",
    trusted_root: bytes | None = None,
    now: datetime | None = None,
) -> TrustedTargets:
    """Verify the repository in ``store`` from ``trusted_root`` (default: its first root)
    and return its targets; any refusal is a :class:`VerificationError` naming ``name``
    and the role, a missing file a :class:`StorageError`."""
    when = now if now is not None else datetime.now(UTC)

    def read(path: str) -> bytes:
        data = store.read(path)
        if data is None:
            raise StorageError(f"{name}: {path} is missing")
        return data

    def parse(data: bytes, role: str, path: str) -> Metadata[Any]:
        with tuf_errors(f"{name}: {path}"):
            md = Metadata[Any].from_bytes(data)
        if md.signed.type != role:
            raise MetadataError(f"{name}: {path} holds {md.signed.type} metadata, not {role}")
        return md

    def verified(delegator: Root | Targets, role: str, md: Metadata[Any], path: str) -> None:
        with tuf_errors(f"{name}: {path} is not signed by the {role} keys"):
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        if md.signed.is_expired(when):
            raise ExpiredError(f"{name}: {path} expired at {md.signed.expires:%Y-%m-%d %H:%M}Z")

    def pinned(meta: MetaFile, data: bytes, path: str) -> None:
        try:
            meta.verify_length_and_hashes(data)
        except tuf_exceptions.LengthOrHashMismatchError:
            raise TamperedError(
                f"{name}: {path} does not match its signed length and hashes"
            ) from None

    # 1. root: the anchor signs itself; every newer version is signed by old and new.
    anchor = trusted_root if trusted_root is not None else read("metadata/1.root.json")
    root_md = parse(anchor, Root.type, "the trusted root")
    with tuf_errors(f"{name}: the trusted root is not signed by its own keys"):
        root_md.signed.verify_delegate(Root.type, root_md.signed_bytes, root_md.signatures)
    for _ in range(_MAX_ROOT_ROTATIONS):
        version = root_md.signed.version + 1
        path = f"metadata/{version}.root.json"
        data = store.read(path)
        if data is None:
            break
        new = parse(data, Root.type, path)
        with tuf_errors(f"{name}: {path} is not signed by the previous root"):
            root_md.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        with tuf_errors(f"{name}: {path} is not signed by its own keys"):
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        if new.signed.version != version:
            raise MetadataVersionError(f"{name}: {path} says version {new.signed.version}")
        root_md = new
    root: Root = root_md.signed
    if root.is_expired(when):
        raise ExpiredError(f"{name}: root version {root.version} expired at {root.expires}")
    expiries = [root.expires]

    # 2. timestamp
    ts_md = parse(read("metadata/timestamp.json"), Timestamp.type, "timestamp.json")
    verified(root, Timestamp.type, ts_md, "timestamp.json")
    timestamp: Timestamp = ts_md.signed
    expiries.append(timestamp.expires)

    # 3. snapshot, as the timestamp pins it
    path = f"metadata/{timestamp.snapshot_meta.version}.snapshot.json"
    data = read(path)
    pinned(timestamp.snapshot_meta, data, path)
    snap_md = parse(data, Snapshot.type, path)
    verified(root, Snapshot.type, snap_md, path)
    snapshot: Snapshot = snap_md.signed
    if snapshot.version != timestamp.snapshot_meta.version:
        raise MetadataVersionError(f"{name}: {path} says version {snapshot.version}")
    expiries.append(snapshot.expires)

    def role_metadata(delegator: Root | Targets, role: str) -> Targets:
        meta = snapshot.meta.get(f"{role}.json")
        if meta is None:
            raise MetadataError(f"{name}: the snapshot lists no {role}")
        path = f"metadata/{meta.version}.{role}.json"
        data = read(path)
        pinned(meta, data, path)
        md = parse(data, Targets.type, path)
        verified(delegator, role, md, path)
        if md.signed.version != meta.version:
            raise MetadataVersionError(f"{name}: {path} says version {md.signed.version}")
        expiries.append(md.signed.expires)
        signed: Targets = md.signed
        return signed

    # 4. targets, and the succinct hash bins it delegates
    top = role_metadata(root, Targets.type)
    listed: dict[str, TargetFile] = dict(top.targets)
    succinct = top.delegations.succinct_roles if top.delegations is not None else None
    if succinct is not None:
        for bin_name in succinct.get_roles():
            if f"{bin_name}.json" not in snapshot.meta:
                continue
            for path, entry in role_metadata(top, bin_name).targets.items():
                if succinct.get_role_for_target(path) != bin_name:
                    raise MetadataError(f"{name}: bin {bin_name} lists {path!r}, not its own")
                listed[path] = entry
    return TrustedTargets(
        name=name, store=store, targets=MappingProxyType(listed), expires=min(expiries)
    )
