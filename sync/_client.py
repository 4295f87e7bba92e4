"""The site's side: enrolment, and a refresh of both repositories that ends in a verified
bundle on disk — or in an error that says what was refused.

A site's state directory (0700)::

    site.json                 site, region, the site key's public half
    site.key                  the site's Ed25519 key for status reports (0600)
    trust/catalogue.root.json the roots the site was provisioned with (trust anchors)
    trust/director.root.json
    trust/catalogue/, trust/director/   python-tuf's metadata caches (every root version
                              seen, the newest timestamp, snapshot and targets)
    installed.json            per bundle name: the highest release counter installed, the
                              bundle run now and the one run before it
    bundles/<name>/<version>/ verified bundles (manifest.json and the edge model)

TUF is never on the serving path: :meth:`SiteSync.update` returns a
:class:`VerifiedBundle` (name, version, release counter, hashes, length, local path),
which the agent loads and records (:meth:`SiteSync.record_installed`) once it runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from fogline.compression import DeltaError, apply_delta
from fogline.sync._bundle import Bundle, file_sha256
from fogline.sync._fetch import HttpFetcher
from fogline.sync._freshness import Freshness, read_freshness
from fogline.sync._keys import (
    generate_key,
    make_private_dir,
    read_key,
    write_key,
    write_private_file,
)
from fogline.sync._names import check_name
from fogline.sync._release import MANIFEST, Release, delta_path, file_path, site_path
from fogline.sync._tuf_errors import tuf_errors
from fogline.sync._verify import (
    Decision,
    FileEntry,
    RanBundle,
    SiteState,
    check_delta,
    check_file,
    decide,
    manifest_files,
    read_desired,
    site_files,
)
from fogline.sync.errors import (
    FetchError,
    MetadataError,
    StorageError,
    TamperedError,
    VerificationError,
)

__all__ = ["SiteIdentity", "SiteSync", "VerifiedBundle", "enroll"]

SITE_FORMAT = 1
_log = logging.getLogger(__name__)
_REPOSITORIES = ("catalogue", "director")


@dataclass(frozen=True)
class SiteIdentity:
    """An enrolled site: its name, region, state directory and public key (which the
    rollout service registers to verify the site's status reports)."""

    site: str
    region: str
    state_dir: Path
    public_key: SSlibKey

    @classmethod
    def load(cls, state_dir: Path) -> SiteIdentity:
        path = Path(state_dir) / "site.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StorageError(f"{state_dir} is not an enrolled site: no site.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != SITE_FORMAT:
            raise StorageError(f"{path} is not a fogline site file (format {SITE_FORMAT})")
        try:
            key = data["public_key"]
            return cls(
                site=check_name(data["site"], "site"),
                region=check_name(data["region"], "region"),
                state_dir=Path(state_dir),
                public_key=SSlibKey.from_dict(key["keyid"], dict(key["key"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{path} is incomplete: {exc}") from exc

    def signer(self) -> CryptoSigner:
        """The site's signing key, for status reports."""
        signer = read_key(self.state_dir / "site.key")
        if signer.public_key.keyid != self.public_key.keyid:
            raise StorageError(f"{self.state_dir / 'site.key'} is not the key site.json names")
        return signer


def _root_bytes(root: bytes | Path, what: str) -> bytes:
    if isinstance(root, bytes):
        return root
    try:
        return Path(root).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read the {what} root {root}: {exc.strerror or exc}") from exc


def _checked_root(data: bytes, what: str) -> Metadata[Root]:
    with tuf_errors(f"the {what} root"):
        md = Metadata[Root].from_bytes(data)
    if not isinstance(md.signed, Root):
        raise MetadataError(f"the {what} root file holds {md.signed.type} metadata, not root")
    with tuf_errors(f"the {what} root is not signed by its own keys"):
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    return md


def enroll(
    state_dir: Path,
    catalogue_root: bytes | Path,
    director_root: bytes | Path,
    site: str,
    region: str,
) -> SiteIdentity:
    """Provision a site once: its trust anchors (the two repositories' root metadata), its
    name and region, and a new Ed25519 key for its status reports, all owner-only.

    A directory already enrolled is refused: the site key a rollout service registered
    must not change behind its back.
    """
    check_name(site, "site")
    check_name(region, "region")
    state_dir = Path(state_dir)
    roots = {
        "catalogue": _root_bytes(catalogue_root, "catalogue"),
        "director": _root_bytes(director_root, "director"),
    }
    if roots["catalogue"] == roots["director"]:
        raise ValueError("the catalogue and director roots are the same file; each has its own")
    parsed = {repo: _checked_root(data, repo) for repo, data in roots.items()}
    if set(parsed["catalogue"].signed.keys) & set(parsed["director"].signed.keys):
        raise ValueError("the catalogue and director roots share keys; each needs its own")
    if (state_dir / "site.json").exists():
        raise ValueError(f"{state_dir} is already enrolled; remove it to enroll again")
    make_private_dir(state_dir)
    make_private_dir(state_dir / "trust")
    for repo, data in roots.items():
        write_private_file(state_dir / "trust" / f"{repo}.root.json", data)
    signer = generate_key()
    write_key(state_dir / "site.key", signer)
    public = signer.public_key
    write_private_file(
        state_dir / "site.json",
        (
            json.dumps(
                {
                    "format": SITE_FORMAT,
                    "site": site,
                    "region": region,
                    "public_key": {"keyid": public.keyid, "key": public.to_dict()},
                },
                indent=2,
            )
            + "\n"
        ).encode(),
    )
    return SiteIdentity(site=site, region=region, state_dir=state_dir, public_key=public)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle both repositories agreed on, verified on disk at ``path``. ``installed``
    is true when the site already runs this release.

    ``files`` holds every file of the signed manifest with its length and SHA-256; only
    the edge model is on disk (a site runs nothing else). ``bytes_transferred`` is what
    this update downloaded of the bundle's targets (the manifest, deltas, whole files;
    metadata not counted), ``bytes_full`` what downloading the manifest and the edge model
    whole would have been; both are 0 when a verified copy was already here."""

    release: Release
    path: Path
    files: Mapping[str, FileEntry]
    installed: bool
    bytes_transferred: int = 0
    bytes_full: int = 0
    #: the names of ``files`` the site holds on disk (the edge model)
    local: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        return self.release.id

    @property
    def manifest_sha256(self) -> str:
        return self.release.sha256


class SiteSync:
    """One site's refreshes of the director and the catalogue.

    Each :meth:`check` and :meth:`update` makes fresh python-tuf ``Updater`` objects
    (python-tuf fixes "now" when one is made), bootstrapped from the provisioned roots and
    walking every newer root version one by one.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        catalogue_url: str,
        director_url: str,
        agent_version: str,
        onnxruntime: str,
        execution_providers: tuple[str, ...] = ("CPUExecutionProvider",),
        fetcher: FetcherInterface | None = None,
        updater_config: UpdaterConfig | None = None,
    ) -> None:
        self.identity = SiteIdentity.load(state_dir)
        self.state_dir = Path(state_dir)
        self._urls = {"catalogue": catalogue_url.rstrip("/"), "director": director_url.rstrip("/")}
        self._agent_version = agent_version
        self._onnxruntime = onnxruntime
        self._providers = tuple(execution_providers)
        self._fetcher = fetcher if fetcher is not None else HttpFetcher()
        self._config = updater_config
        self.delta_failures = 0
        """Deltas that failed (refused, corrupt, unreachable) and gave way to whole files."""
        SiteState(
            site=self.identity.site,
            region=self.identity.region,
            agent_version=agent_version,
            onnxruntime=onnxruntime,
            execution_providers=self._providers,
        )

    # -------------------------------------------------------------------------- state

    def _installed(self) -> dict[str, Any]:
        path = self.state_dir / "installed.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"releases": {}}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise StorageError(f"{path} must hold a JSON object")
        return data

    def installed_releases(self) -> dict[str, int]:
        """The highest release counter installed, per bundle name."""
        path = self.state_dir / "installed.json"
        releases = self._installed().get("releases")
        if not isinstance(releases, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in releases.values()
        ):
            raise StorageError(f"{path} must map bundle names to release counters")
        return {str(k): v for k, v in releases.items()}

    def ran_bundles(self) -> tuple[dict[str, RanBundle], dict[str, RanBundle]]:
        """The bundle the site runs and the one it ran immediately before, per name
        (``installed.json`` written before these were kept has neither)."""
        data = self._installed()
        out: list[dict[str, RanBundle]] = []
        for what in ("running", "previous"):
            ran = data.get(what, {})
            try:
                out.append({str(name): RanBundle(**info) for name, info in dict(ran).items()})
            except (TypeError, ValueError) as exc:
                raise StorageError(
                    f"{self.state_dir / 'installed.json'}: {what} is unusable: {exc}"
                ) from None
        return out[0], out[1]

    def state(self) -> SiteState:
        running, previous = self.ran_bundles()
        return SiteState(
            site=self.identity.site,
            region=self.identity.region,
            agent_version=self._agent_version,
            onnxruntime=self._onnxruntime,
            execution_providers=self._providers,
            releases=self.installed_releases(),
            running=running,
            previous=previous,
        )

    def record_installed(self, bundle: VerifiedBundle) -> None:
        """Remember that the site runs ``bundle``: later bundles of its name may not have a
        lower release counter, but for the bundle it ran until now (kept as ``previous``,
        the one it may be rolled back to)."""
        releases = self.installed_releases()
        running, previous = self.ran_bundles()
        release = bundle.release
        releases[release.name] = max(releases.get(release.name, 0), release.release)
        now = running.get(release.name)
        if now is None or not now.is_release(release):
            if now is not None:
                previous[release.name] = now
            running[release.name] = RanBundle.of(release)
        _replace(
            self.state_dir / "installed.json",
            {
                "releases": releases,
                "running": {k: v.to_dict() for k, v in running.items()},
                "previous": {k: v.to_dict() for k, v in previous.items()},
            },
        )

    def freshness(self, now: datetime | None = None) -> Freshness:
        """Versions and expiry of the trusted metadata this site holds, and whether any
        has expired at ``now`` (default: the wall clock): see
        :func:`~fogline.sync._freshness.read_freshness`."""
        return read_freshness(self.state_dir, now)

    # ------------------------------------------------------------------------ refresh

    def _updater(self, repo: str) -> Updater:
        trust = self.state_dir / "trust"
        anchor = trust / f"{repo}.root.json"
        try:
            bootstrap = anchor.read_bytes()
            (trust / repo).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot read the {repo} trust anchor: {exc.strerror}") from exc
        base = self._urls[repo]
        with tuf_errors(f"{repo}: loading the trusted root"):
            return Updater(
                metadata_dir=str(trust / repo),
                metadata_base_url=f"{base}/metadata/",
                target_dir=None,
                target_base_url=f"{base}/targets/",
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=bootstrap,
            )

    def _decide(self) -> tuple[Decision | None, Updater | None]:
        state = self.state()
        director = self._updater("director")
        with tuf_errors("director"):
            director.refresh()
            entry = director.get_targetinfo(site_path(state.site))
        desired = read_desired(state.site, entry)
        if desired is None:
            return None, None
        catalogue = self._updater("catalogue")
        with tuf_errors("catalogue"):
            catalogue.refresh()
            released = catalogue.get_targetinfo(desired.target)
        return decide(state, desired, released), catalogue

    def check(self) -> Decision | None:
        """What the repositories tell this site to run, verified; ``None`` when the
        director has no desired state for it. Nothing is downloaded but metadata."""
        return self._decide()[0]

    def update(self) -> VerifiedBundle | None:
        """Refresh both repositories and fetch the bundle they agree on (unless a verified
        copy is already here); ``None`` when the director has nothing for this site. Any
        refusal is a :class:`VerificationError`, any transport failure a
        :class:`FetchError`.

        Only what the site runs is fetched: the manifest and the edge model. A model file
        whose signed SHA-256 the site holds in any of its bundles is copied from there; else
        a delta the catalogue lists from a file the site holds is downloaded and applied;
        else the file is downloaded whole. Every file is checked against the catalogue's
        length and SHA-256 whichever way it came, and a delta that fails in any way gives
        way to the whole file."""
        decision, catalogue = self._decide()
        if decision is None or catalogue is None:
            return None
        release = decision.release
        final = self.state_dir / "bundles" / release.name / release.version
        have = self._verified_copy(final, release, decision.installed)
        if have is not None:
            return have
        make_private_dir(self.state_dir / "bundles")
        make_private_dir(final.parent)
        held = self._held_files()
        try:
            staging = Path(
                tempfile.mkdtemp(prefix=f".partial-{release.version}-", dir=final.parent)
            )
        except OSError as exc:
            raise StorageError(f"cannot stage {release.id}: {exc.strerror or exc}") from exc
        try:
            manifest = staging / MANIFEST
            manifest_entry = TargetFile(release.length, {"sha256": release.sha256}, release.path)
            with tuf_errors(f"catalogue: downloading {release.path}"):
                catalogue.download_target(manifest_entry, filepath=str(manifest))
            data = manifest.read_bytes()
            files = manifest_files(data, release)
            needed = site_files(data, release, files)
            transferred = full = release.length
            for entry in files.values():
                path = file_path(release.name, release.version, entry.name)
                with tuf_errors(f"catalogue: {path}"):
                    info = check_file(release, entry, catalogue.get_targetinfo(path))
                if entry.name not in needed:
                    continue
                full += entry.length
                target = staging / entry.name
                if self._copy_held(held, entry, target):
                    continue
                sent, rebuilt = self._from_delta(catalogue, release, entry, held, target)
                transferred += sent
                if rebuilt:
                    continue
                with tuf_errors(f"catalogue: {path}"):
                    catalogue.download_target(info, filepath=str(target))
                transferred += entry.length
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except OSError as exc:
            raise StorageError(f"cannot store {release.id}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        Bundle.load(final, part="edge")
        return VerifiedBundle(
            release=release,
            path=final,
            files=files,
            installed=decision.installed,
            bytes_transferred=transferred,
            bytes_full=full,
            local=needed,
        )

    # ------------------------------------------------------------ what the site holds

    def _held_files(self) -> dict[str, list[Path]]:
        """SHA-256 → the files of the site's bundles said (by their manifests) to hold it.
        What a manifest says is checked again when a file is used."""
        held: dict[str, list[Path]] = {}
        root = self.state_dir / "bundles"
        try:
            dirs = sorted(p for p in root.glob("*/*") if p.is_dir())
        except OSError:
            return held
        for bundle_dir in dirs:
            if bundle_dir.name.startswith(".") or bundle_dir.parent.name.startswith("."):
                continue
            try:
                manifest = json.loads((bundle_dir / MANIFEST).read_text())
            except (OSError, UnicodeDecodeError, ValueError, RecursionError):
                continue
            files = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(files, dict):
                continue
            for name, info in files.items():
                sha256 = info.get("sha256") if isinstance(info, dict) else None
                path = bundle_dir / str(name)
                if isinstance(sha256, str) and "/" not in str(name) and path.is_file():
                    held.setdefault(sha256, []).append(path)
        return held

    @staticmethod
    def _read_held(
        held: Mapping[str, list[Path]], sha256: str, length: int | None = None
    ) -> bytes | None:
        """The bytes of a held file with this SHA-256 (and length), checked; ``None`` if
        none is here."""
        for path in held.get(sha256, ()):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if length is not None and len(data) != length:
                continue
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
        return None

    def _copy_held(self, held: Mapping[str, list[Path]], entry: FileEntry, target: Path) -> bool:
        data = self._read_held(held, entry.sha256, entry.length)
        if data is None:
            return False
        _write_private(target, data)
        return True

    def _from_delta(
        self,
        catalogue: Updater,
        release: Release,
        entry: FileEntry,
        held: Mapping[str, list[Path]],
        target: Path,
    ) -> tuple[int, bool]:
        """Rebuild ``entry`` at ``target`` from a delta the catalogue lists from a file the
        site holds: (bytes downloaded, whether ``target`` was written). A delta that was
        fetched and then failed counts its signed length, at most what the fetcher read.
        Files of the same name are tried first as bases: deltas are made from them."""
        bases = sorted(held, key=lambda sha: all(p.name != entry.name for p in held[sha]))
        for base_sha256 in bases:
            path = delta_path(release.name, release.version, entry.name, base_sha256)
            fetched = 0
            try:
                with tuf_errors(f"catalogue: {path}"):
                    info = check_delta(release, entry, base_sha256, catalogue.get_targetinfo(path))
                if info is None:
                    continue
                base = self._read_held(held, base_sha256)
                if base is None:
                    continue
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    delta_file = Path(tmp) / "delta"
                    fetched = info.length
                    with tuf_errors(f"catalogue: downloading {path}"):
                        catalogue.download_target(info, filepath=str(delta_file))
                    delta = delta_file.read_bytes()
                rebuilt = apply_delta(base, delta, max_output=entry.length)
                if len(rebuilt) != entry.length or (
                    hashlib.sha256(rebuilt).hexdigest() != entry.sha256
                ):
                    raise TamperedError(f"{path} rebuilt a file other than the signed one")
            except (VerificationError, FetchError, DeltaError) as exc:
                _log.warning(
                    "%s: delta to %s from %s… not used (%s); downloading the whole file",
                    release.id,
                    entry.name,
                    base_sha256[:16],
                    exc,
                )
                self.delta_failures += 1
                return fetched, False
            _write_private(target, rebuilt)
            return fetched, True
        return 0, False

    @staticmethod
    def _verified_copy(final: Path, release: Release, installed: bool) -> VerifiedBundle | None:
        manifest = final / MANIFEST
        if not manifest.is_file():
            return None
        try:
            if file_sha256(manifest) != release.sha256:
                return None
            data = manifest.read_bytes()
            files = manifest_files(data, release)
            local = site_files(data, release, files)
            Bundle.load(final, part="edge")
        except (OSError, VerificationError):
            return None
        return VerifiedBundle(
            release=release,
            path=final,
            files=files,
            installed=installed,
            bytes_transferred=0,
            bytes_full=0,
            local=local,
        )


def _write_private(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)


def _replace(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` whole (temporary file, fsync, rename), owner-only."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
