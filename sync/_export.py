"""Air-gapped sites: one file that carries a bundle to a site, verified there as online.

An export is a plain tar archive (deterministic: members in one order, no absolute path,
mode 0644, owner 0, time 0) holding what one site needs to verify and install one bundle::

    export.json                              what is inside (format, site, bundle, members)
    catalogue/metadata/1.root.json … N.root.json, timestamp.json,
              <v>.snapshot.json, <v>.targets.json
    catalogue/targets/<name>/<version>/<sha256>.manifest.json, <sha256>.<model file> …
    director/metadata/1.root.json … N.root.json, timestamp.json,
             <v>.snapshot.json, <v>.targets.json, <v>.sites-<bin>.json (the site's bin)

The site reads it with :class:`ArchiveFetcher`, a python-tuf ``FetcherInterface`` that maps
the two repositories' URLs onto the members, so :func:`import_bundle` is
:class:`~fogline.sync.SiteSync` itself: python-tuf checks signatures, versions, expiry,
lengths and hashes exactly as it does online, and the director and the catalogue must
agree as they must online. ``export.json`` is not signed and is believed for nothing but
a friendly early "this export is for another site".

Why tar (standard library ``tarfile``): one file that any operator can list with
``tar tvf``; read member by member without unpacking; no compression, since the model
files are already dense and the metadata is small.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp
from tuf.ngclient import FetcherInterface, UpdaterConfig

from fogline.sync._catalogue import _hashed_name
from fogline.sync._client import SiteIdentity, SiteSync, VerifiedBundle
from fogline.sync._home import REPOSITORIES, SyncHome
from fogline.sync._names import check_target_path
from fogline.sync._release import Release, file_path, site_path
from fogline.sync._store import Store
from fogline.sync._tuf_errors import tuf_errors
from fogline.sync._verify import manifest_files, site_files
from fogline.sync.errors import (
    ArchiveError,
    FetchError,
    MetadataError,
    PublishError,
    StorageError,
    UnsafeMemberError,
    UnsafePathError,
    WrongSiteError,
)

__all__ = [
    "EXPORT_FORMAT",
    "ArchiveFetcher",
    "ExportManifest",
    "ExportSummary",
    "export_bundle",
    "export_members",
    "import_bundle",
    "write_export",
]

EXPORT_FORMAT = 1
EXPORT_MANIFEST = "export.json"
_KIND = "fogline-export"
# Bounds on what is read before python-tuf's own bounds apply: the member list (a bundle
# has a handful of files, a repository a few hundred root versions at most) and the
# unsigned manifest.
MAX_MEMBERS = 4096
MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 64 * 1024
_ROOT_VERSIONS_MAX = 1024


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ExportSummary:
    """A written export: where, for which site and release, whether the site had to be
    assigned first, its members (path → length), its size, and the earliest ``expires``
    of the metadata inside (past it, the site refuses the export)."""

    path: Path
    site: str
    release: Release
    assigned: bool
    members: Mapping[str, int]
    size_bytes: int
    expires: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "site": self.site,
            "bundle": self.release.to_dict(),
            "assigned": self.assigned,
            "members": len(self.members),
            "bytes": self.size_bytes,
            "expires": _iso(self.expires),
        }


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(store: Store, repository: str, path: str) -> bytes:
    data = store.read(path)
    if data is None:
        raise MetadataError(f"{repository}: {path} is missing")
    return data


def _parse(data: bytes, repository: str, path: str) -> Metadata[Any]:
    with tuf_errors(f"{repository}: reading {path}"):
        return Metadata[Any].from_bytes(data)


def _repository_metadata(
    store: Store, repository: str, bin_target: str | None
) -> tuple[dict[str, bytes], datetime]:
    """Every root version and the current timestamp, snapshot, targets (and the bin that
    holds ``bin_target``) of one repository, by stored path; and their earliest expiry."""
    out: dict[str, bytes] = {}
    newest = _parse(_read(store, repository, "metadata/root.json"), repository, "root.json")
    if not 1 <= newest.signed.version <= _ROOT_VERSIONS_MAX:
        raise MetadataError(f"{repository}: root version {newest.signed.version} is out of range")
    for version in range(1, newest.signed.version + 1):
        path = f"metadata/{version}.root.json"
        out[path] = _read(store, repository, path)
    expiries = [newest.signed.expires]
    out["metadata/timestamp.json"] = _read(store, repository, "metadata/timestamp.json")
    timestamp = _parse(out["metadata/timestamp.json"], repository, "timestamp.json").signed
    if not isinstance(timestamp, Timestamp):
        raise MetadataError(f"{repository}: timestamp.json holds {timestamp.type} metadata")
    expiries.append(timestamp.expires)
    path = f"metadata/{timestamp.snapshot_meta.version}.snapshot.json"
    out[path] = _read(store, repository, path)
    snapshot = _parse(out[path], repository, path).signed
    if not isinstance(snapshot, Snapshot):
        raise MetadataError(f"{repository}: {path} holds {snapshot.type} metadata")
    expiries.append(snapshot.expires)
    roles = ["targets"]
    if bin_target is not None:
        targets_info = snapshot.meta.get("targets.json")
        if targets_info is None:
            raise MetadataError(f"{repository}: the snapshot lists no targets")
        top = _parse(
            _read(store, repository, f"metadata/{targets_info.version}.targets.json"),
            repository,
            "targets.json",
        ).signed
        if not isinstance(top, Targets) or top.delegations is None:
            raise MetadataError(f"{repository}: targets delegates no site bins")
        succinct = top.delegations.succinct_roles
        if succinct is None:
            raise MetadataError(f"{repository}: targets delegates no site bins")
        roles.append(succinct.get_role_for_target(bin_target))
    for role in roles:
        info = snapshot.meta.get(f"{role}.json")
        if info is None:
            raise MetadataError(f"{repository}: the snapshot lists no {role}")
        path = f"metadata/{info.version}.{role}.json"
        out[path] = _read(store, repository, path)
        expiries.append(_parse(out[path], repository, path).signed.expires)
    return out, min(expiries)


def export_members(
    catalogue: Store, director: Store, site: str, release: Release
) -> tuple[dict[str, bytes], datetime]:
    """What ``site`` needs to verify and install ``release``, by member name
    (``catalogue/…``, ``director/…``), and the earliest expiry of the metadata among them.

    The director must already name ``release`` for ``site``: an export carries the
    director's word, it does not make it."""
    director_meta, director_expires = _repository_metadata(director, "director", site_path(site))
    catalogue_meta, catalogue_expires = _repository_metadata(catalogue, "catalogue", None)
    members = {f"director/{p}": d for p, d in director_meta.items()}
    members.update({f"catalogue/{p}": d for p, d in catalogue_meta.items()})
    manifest_name = _hashed_name(release.path, release.sha256)
    manifest = _read(catalogue, "catalogue", manifest_name)
    members[f"catalogue/{manifest_name}"] = manifest
    targets_path = next(p for p in catalogue_meta if p.endswith(".targets.json"))
    targets = _parse(catalogue_meta[targets_path], "catalogue", targets_path).signed
    if not isinstance(targets, Targets):
        raise MetadataError(f"catalogue: {targets_path} holds {targets.type} metadata")
    files = manifest_files(manifest, release)
    # what the site downloads online (the edge model), no more: the cloud part stays home
    for entry in (files[name] for name in sorted(site_files(manifest, release, files))):
        path = file_path(release.name, release.version, entry.name)
        info = targets.targets.get(path)
        if info is None:
            raise MetadataError(f"catalogue: {path} of {release.id} is not listed")
        stored = _hashed_name(path, info.hashes["sha256"])
        members[f"catalogue/{stored}"] = _read(catalogue, "catalogue", stored)
    return members, min(director_expires, catalogue_expires)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_export(out: Path, manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> int:
    """Write ``export.json`` and ``members`` (sorted by name) to ``out`` as one tar,
    whole (temporary file, fsync, rename); the size in bytes."""
    out = Path(out)
    for name in members:
        check_target_path(name)
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tar_info(EXPORT_MANIFEST, len(body)), io.BytesIO(body))
                for name in sorted(members):
                    data = members[name]
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


def export_manifest(
    site: str, release: Release, members: Mapping[str, bytes], expires: datetime
) -> dict[str, Any]:
    """The ``export.json`` of an export: what is inside, for a person or a first check."""
    return {
        "format": EXPORT_FORMAT,
        "kind": _KIND,
        "site": site,
        "bundle": release.to_dict(),
        "expires": _iso(expires),
        "members": {
            name: {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(members.items())
        },
    }


def export_bundle(home: SyncHome, name: str, version: str, site: str, out: Path) -> ExportSummary:
    """Write the export of ``name`` ``version`` for ``site`` to ``out``.

    When the director does not already name this release for ``site`` it is assigned
    first, which needs the director's online keys (targets, snapshot, timestamp)."""
    with home.lock():
        release = home.catalogue().get(name, version)
        if release is None:
            raise PublishError(f"{name}@{version} is not released")
        try:
            desired = home.director().desired(site)
        except ValueError as exc:
            raise PublishError(str(exc)) from None
        assigned = desired != release
        if assigned:
            home.director(("targets", "snapshot", "timestamp")).assign([site], release)
        stores = {repo: home.writer(repo).store for repo in REPOSITORIES}
        members, expires = export_members(stores["catalogue"], stores["director"], site, release)
        size = write_export(out, export_manifest(site, release, members, expires), members)
    return ExportSummary(
        path=Path(out),
        site=site,
        release=release,
        assigned=assigned,
        members={n: len(d) for n, d in members.items()},
        size_bytes=size,
        expires=expires,
    )


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ExportManifest:
    """``export.json`` as read (unsigned: for messages and a first check only)."""

    site: str
    bundle: str
    expires: str
    members: Mapping[str, int]

    @classmethod
    def parse(cls, data: bytes, file: Path) -> ExportManifest:
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ArchiveError(f"{file}: {EXPORT_MANIFEST} is not JSON: {exc}") from None
        if (
            not isinstance(raw, dict)
            or raw.get("kind") != _KIND
            or raw.get("format") != EXPORT_FORMAT
        ):
            raise ArchiveError(f"{file} is not a fogline export (format {EXPORT_FORMAT})")
        bundle = raw.get("bundle")
        members = raw.get("members")
        if (
            not isinstance(raw.get("site"), str)
            or not isinstance(bundle, dict)
            or not isinstance(members, dict)
        ):
            raise ArchiveError(f"{file}: {EXPORT_MANIFEST} lacks site, bundle or members")
        try:
            lengths = {str(k): int(v["length"]) for k, v in members.items()}
        except (KeyError, TypeError, ValueError):
            raise ArchiveError(f"{file}: {EXPORT_MANIFEST} has a member without a length") from None
        return cls(
            site=raw["site"],
            bundle=f"{bundle.get('name')}@{bundle.get('version')}",
            expires=str(raw.get("expires", "")),
            members=lengths,
        )


def _check_member(member: tarfile.TarInfo, file: Path) -> str:
    """The member's name if it is a plain file with a safe relative name, else
    :class:`UnsafeMemberError`."""
    name = member.name
    if member.issym() or member.islnk():
        raise UnsafeMemberError(f"{file}: member {name!r} is a link")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeMemberError(f"{file}: member {name!r} is a device or a pipe")
    if member.issparse():
        raise UnsafeMemberError(f"{file}: member {name!r} is a sparse file")
    if not member.isfile():
        raise UnsafeMemberError(f"{file}: member {name!r} is not a regular file")
    try:
        check_target_path(name)
    except UnsafePathError as exc:
        raise UnsafeMemberError(f"{file}: member {name!r} has an unsafe name: {exc}") from None
    top = name.split("/", 1)[0]
    if name != EXPORT_MANIFEST and (top not in REPOSITORIES or "/" not in name):
        raise UnsafeMemberError(
            f"{file}: member {name!r} is neither {EXPORT_MANIFEST} nor under catalogue/ "
            "or director/"
        )
    return name


class ArchiveFetcher(FetcherInterface):
    """python-tuf fetcher over an export file: ``<catalogue_url>/X`` is the member
    ``catalogue/X``, ``<director_url>/X`` the member ``director/X``; anything else, and a
    member the export lacks, is an HTTP 404 (as a repository answers for a root version
    not made).

    The whole file is checked when it is opened: a tar archive, at most
    :data:`MAX_MEMBERS` members, each a regular file with a safe relative name
    (:class:`UnsafeMemberError` otherwise: links, devices, ``..``, absolute names), no name
    twice, every member's data inside the file, and an ``export.json`` of this format
    (:class:`ArchiveError`). A member longer than python-tuf asks for (``max_length``: the
    signed length, or its bound on a metadata file) is refused before a byte of it is read.
    """

    CATALOGUE_URL = "export://catalogue"
    DIRECTOR_URL = "export://director"

    def __init__(
        self,
        file: Path,
        *,
        catalogue_url: str = CATALOGUE_URL,
        director_url: str = DIRECTOR_URL,
    ) -> None:
        self.file = Path(file)
        self.catalogue_url = catalogue_url.rstrip("/")
        self.director_url = director_url.rstrip("/")
        self.requested: list[str] = []
        self.bytes_read = 0
        """Member bytes read so far (``export.json`` not counted)."""
        try:
            self._fh: IO[bytes] = self.file.open("rb")
        except OSError as exc:
            raise StorageError(f"cannot read {self.file}: {exc.strerror or exc}") from exc
        try:
            self._tar, self._members = self._scan()
            self.manifest = self._read_manifest()
        except BaseException:
            self._fh.close()
            raise

    def _scan(self) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        size = os.fstat(self._fh.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=self._fh, mode="r:")  # noqa: SIM115 (closed in close())
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.file} is not a fogline export: not a tar file") from exc
        members: dict[str, tarfile.TarInfo] = {}
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                if len(members) >= MAX_MEMBERS:
                    raise ArchiveError(f"{self.file} holds more than {MAX_MEMBERS} members")
                name = _check_member(member, self.file)
                if name in members:
                    raise ArchiveError(f"{self.file} holds member {name!r} twice")
                if member.offset_data + member.size > size:
                    raise ArchiveError(f"{self.file} is truncated inside member {name!r}")
                members[name] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"{self.file} is not a fogline export: {exc}") from exc
        return tar, members

    def _read_manifest(self) -> ExportManifest:
        member = self._members.get(EXPORT_MANIFEST)
        if member is None:
            raise ArchiveError(f"{self.file} is not a fogline export: no {EXPORT_MANIFEST}")
        if member.size > MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{self.file}: {EXPORT_MANIFEST} is over {MAX_MANIFEST_BYTES} B")
        data = b"".join(self._chunks(member, member.size, count=False))
        return ExportManifest.parse(data, self.file)

    # ------------------------------------------------------------------ the interface

    def member_for(self, url: str) -> str | None:
        """The member a URL maps to (``None``: none)."""
        for repository, base in (
            ("catalogue", self.catalogue_url),
            ("director", self.director_url),
        ):
            if url.startswith(base + "/"):
                return f"{repository}/{url[len(base) + 1 :]}"
        return None

    def _member(self, url: str) -> tarfile.TarInfo:
        self.requested.append(url)
        name = self.member_for(url)
        member = None if name is None else self._members.get(name)
        if member is None:
            raise tuf_exceptions.DownloadHTTPError(f"{url}: not in {self.file}", 404)
        return member

    def _chunks(
        self, member: tarfile.TarInfo, limit: int, *, count: bool = True
    ) -> Iterator[bytes]:
        """At most ``limit`` bytes of ``member``, in chunks."""
        try:
            reader = self._tar.extractfile(member)
            if reader is None:
                raise tuf_exceptions.DownloadError(f"{member.name} is not a regular file")
            left = min(limit, member.size)
            while left > 0:
                chunk = reader.read(min(_CHUNK, left))
                if not chunk:
                    raise tuf_exceptions.DownloadError(f"{self.file}: {member.name} is cut short")
                left -= len(chunk)
                if count:
                    self.bytes_read += len(chunk)
                yield chunk
        except (tarfile.TarError, OSError) as exc:
            raise tuf_exceptions.DownloadError(f"{self.file}: {member.name}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        member = self._member(url)
        return self._chunks(member, member.size)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """The member ``url`` maps to, in a temporary file; one longer than
        ``max_length`` is refused before any of it is read."""
        member = self._member(url)
        if member.size > max_length:
            raise tuf_exceptions.DownloadLengthMismatchError(
                f"{url}: member {member.name} holds {member.size} bytes, more than the "
                f"{max_length} allowed"
            )
        with tempfile.TemporaryFile() as out:
            for chunk in self._chunks(member, max_length):
                out.write(chunk)
            out.seek(0)
            yield out

    def close(self) -> None:
        self._tar.close()
        self._fh.close()

    def __enter__(self) -> ArchiveFetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------- importing


def import_bundle(
    state_dir: Path,
    file: Path,
    *,
    agent_version: str,
    onnxruntime: str,
    execution_providers: Sequence[str] = ("CPUExecutionProvider",),
    record: bool = True,
    updater_config: UpdaterConfig | None = None,
) -> VerifiedBundle:
    """Verify and install the bundle an export carries, exactly as
    :meth:`SiteSync.update` does online (it is ``SiteSync`` over an
    :class:`ArchiveFetcher`): same checks, same trust cache, same ``bundles/`` directory.

    With ``record`` (the default) the bundle is then recorded as installed
    (:meth:`SiteSync.record_installed`), so no later bundle of its name may have a lower
    release counter. An agent importing in-process passes ``record=False`` and records it
    once it runs it. The result's ``installed`` says whether the site already had it.

    An export for another site is a :class:`WrongSiteError`; one that lacks a member
    verification needs, an :class:`ArchiveError`; every refusal of python-tuf or of the
    two-repository check is the :class:`VerificationError` ``update()`` raises online.
    """
    identity = SiteIdentity.load(state_dir)
    with ArchiveFetcher(file) as fetcher:
        if fetcher.manifest.site != identity.site:
            raise WrongSiteError(
                f"{file} is an export for site {fetcher.manifest.site!r}, not {identity.site!r}"
            )
        sync = SiteSync(
            state_dir,
            catalogue_url=fetcher.catalogue_url,
            director_url=fetcher.director_url,
            agent_version=agent_version,
            onnxruntime=onnxruntime,
            execution_providers=tuple(execution_providers),
            fetcher=fetcher,
            updater_config=updater_config,
        )
        try:
            got = sync.update()
        except FetchError as exc:
            # Nothing in a file is transient: a member verification asked for is missing.
            raise ArchiveError(f"{file} lacks what verification needs: {exc}") from exc
        if got is None:
            raise WrongSiteError(
                f"{file}: the director it carries names nothing for site {identity.site!r}"
            )
        if record and not got.installed:
            sync.record_installed(got)
    return got
