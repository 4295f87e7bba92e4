"""The publisher's directory: both repositories, their settings and (by default) the keys.

::

    <home>/settings.json     expiry periods per repository and role, number of site bins
    <home>/catalogue/        the catalogue repository, served as it is (metadata/, targets/)
    <home>/director/         the director repository (metadata/)
    <home>/keys/             0700; <repository>/<role>/<keyid>.pem, each 0600
                             (``keys`` may point elsewhere: offline keys on removable media)

Every change takes ``<home>/.lock`` first, so two commands never write one repository
at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogline.sync._catalogue import Catalogue, Director
from fogline.sync._keys import KeyRing, generate_key, make_private_dir
from fogline.sync._release import Platform, Release
from fogline.sync._store import DirectoryStore
from fogline.sync._writer import TOP_LEVEL_ROLES, Expiry, RefreshReport, RepositoryWriter
from fogline.sync.errors import PublishError, SigningKeyError, StorageError

__all__ = ["DEFAULT_EXPIRY", "REPOSITORIES", "HomeSettings", "SyncHome"]

REPOSITORIES = ("catalogue", "director")
DEFAULT_EXPIRY: Mapping[str, Expiry] = {
    # Release keys stay offline: the catalogue's targets last a quarter between signings.
    "catalogue": Expiry(root_days=365, targets_days=90, snapshot_days=7, timestamp_days=1),
    # Every director key but root is online: its targets and bins are re-signed weekly.
    "director": Expiry(root_days=365, targets_days=7, snapshot_days=7, timestamp_days=1),
}
SETTINGS_FORMAT = 1


class HomeBusyError(StorageError):
    """Another process holds the home's lock (it is signing): try again shortly."""


@dataclass(frozen=True)
class HomeSettings:
    """``settings.json``: expiry per repository, and the director's number of site bins
    (``2**site_bins_bits``)."""

    expiry: Mapping[str, Expiry]
    site_bins_bits: int = 8

    def __post_init__(self) -> None:
        if set(self.expiry) != set(REPOSITORIES):
            raise ValueError(f"expiry must be set for {', '.join(REPOSITORIES)}")
        if not 1 <= self.site_bins_bits <= 16:
            raise ValueError(f"site_bins_bits {self.site_bins_bits} must lie in [1, 16]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SETTINGS_FORMAT,
            "site_bins_bits": self.site_bins_bits,
            "expiry": {repo: self.expiry[repo].to_dict() for repo in REPOSITORIES},
        }

    @classmethod
    def from_dict(cls, data: Any) -> HomeSettings:
        if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
            raise ValueError("settings.json is not a fogline sync settings file (format 1)")
        expiry = data.get("expiry", {})
        return cls(
            expiry={
                repo: Expiry.from_dict({**DEFAULT_EXPIRY[repo].to_dict(), **expiry.get(repo, {})})
                for repo in REPOSITORIES
            },
            site_bins_bits=int(data.get("site_bins_bits", 8)),
        )


class SyncHome:
    """The publisher's directory (see the module docstring)."""

    def __init__(self, path: Path, keys: Path | None = None) -> None:
        self.path = Path(path)
        self.keys = KeyRing(Path(keys) if keys is not None else self.path / "keys")

    # ------------------------------------------------------------------------- layout

    def repository_dir(self, repository: str) -> Path:
        if repository not in REPOSITORIES:
            raise ValueError(f"repository {repository!r} must be catalogue or director")
        return self.path / repository

    def root_file(self, repository: str) -> Path:
        """The newest root of ``repository``: what a site is provisioned with."""
        return self.repository_dir(repository) / "metadata" / "root.json"

    @property
    def settings(self) -> HomeSettings:
        path = self.path / "settings.json"
        try:
            return HomeSettings.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise StorageError(f"{self.path} is not initialised: run `fogline keys init`") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StorageError(f"{path} is unusable: {exc}") from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``<home>/.lock``; another holder is a one-line error, not a wait."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HomeBusyError(f"another command is changing {self.path}") from None
            yield
        finally:
            os.close(fd)

    def writer(self, repository: str, roles: Iterable[str] = ()) -> RepositoryWriter:
        """A writer of ``repository`` signing with the keys of ``roles`` from the key ring;
        a role whose threshold the key ring cannot meet is a :class:`SigningKeyError`."""
        store = DirectoryStore(self.repository_dir(repository))
        expiry = self.settings.expiry[repository]
        writer = RepositoryWriter(store, expiry=expiry, name=repository)
        if not writer.exists:
            raise StorageError(f"{self.path} has no {repository}: run `fogline keys init`")
        root = writer.root()
        for role in roles:
            keyids = set(root.roles[role].keyids)
            signers = self.keys.signers(repository, role, keyids)
            threshold = root.roles[role].threshold
            if len(signers) < threshold:
                raise SigningKeyError(
                    f"{repository} {role} needs {threshold} key(s); {len(signers)} found in "
                    f"{self.keys.root / repository / role}"
                )
            writer.set_signers(role, signers)
        return writer

    # -------------------------------------------------------------------------- setup

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        keys: Path | None = None,
        root_keys: int = 1,
        root_threshold: int = 1,
        expiry: Mapping[str, Expiry] | None = None,
        site_bins_bits: int = 8,
    ) -> SyncHome:
        """A new root of trust for both repositories: ``root_keys`` root keys each
        (``root_threshold`` of them must sign), one key for every other role, empty
        catalogue and director (with ``2**site_bins_bits`` site bins)."""
        if not 1 <= root_threshold <= root_keys:
            raise ValueError(
                f"--root-threshold {root_threshold} must lie in [1, {root_keys}] (--root-keys)"
            )
        if root_keys > 32:
            raise ValueError(f"--root-keys {root_keys} is more than 32")
        settings = HomeSettings(
            expiry={**DEFAULT_EXPIRY, **(expiry or {})}, site_bins_bits=site_bins_bits
        )
        home = cls(path, keys)
        with home.lock():
            if (home.path / "settings.json").exists() or any(
                home.root_file(r).exists() for r in REPOSITORIES
            ):
                raise PublishError(f"{home.path} already holds repositories")
            make_private_dir(home.keys.root)
            (home.path / "settings.json").write_text(
                json.dumps(settings.to_dict(), indent=2) + "\n"
            )
            for repository in REPOSITORIES:
                root_signers = [generate_key() for _ in range(root_keys)]
                role_signers = {r: generate_key() for r in ("targets", "snapshot", "timestamp")}
                for signer in root_signers:
                    home.keys.add(repository, "root", signer)
                for role, signer in role_signers.items():
                    home.keys.add(repository, role, signer)
                writer = RepositoryWriter(
                    DirectoryStore(home.repository_dir(repository)),
                    expiry=settings.expiry[repository],
                    name=repository,
                )
                writer.initialise(
                    root_signers=root_signers,
                    root_threshold=root_threshold,
                    role_signers=role_signers,
                    bins_bit_length=site_bins_bits if repository == "director" else None,
                )
        return home

    def rotate(self, repository: str, role: str, *, keys: int = 1, threshold: int = 1) -> int:
        """New keys for ``role`` of ``repository`` (``keys`` of them, ``threshold`` must
        sign); the old key files are removed once the new root is written. Returns the
        new root version."""
        if role not in TOP_LEVEL_ROLES:
            raise ValueError(f"role {role!r} must be one of {', '.join(TOP_LEVEL_ROLES)}")
        if not 1 <= threshold <= keys:
            raise ValueError(f"threshold {threshold} must lie in [1, {keys}] (the new keys)")
        with self.lock():
            # The old root threshold signs every new root; the old keys of any other role
            # are not needed (a lost key is a reason to rotate it). What the rotated role
            # changes is re-signed: targets → snapshot → timestamp.
            needs = {"root"}
            if role == "targets":
                needs |= {"snapshot", "timestamp"}
            elif role == "snapshot":
                needs.add("timestamp")
            writer = self.writer(repository, sorted(needs))
            new = [generate_key() for _ in range(keys)]
            for signer in new:
                self.keys.add(repository, role, signer)
            version = writer.rotate(role, new, threshold)
            self.keys.retire(repository, role, {s.public_key.keyid for s in new})
        return version

    # ---------------------------------------------------------------------- releasing

    def catalogue(self, roles: Sequence[str] = ()) -> Catalogue:
        return Catalogue(self.writer("catalogue", roles))

    def director(self, roles: Sequence[str] = ()) -> Director:
        return Director(self.writer("director", roles))

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
        """Release a bundle into the catalogue, signed with the release keys, with deltas
        from the ``deltas`` newest earlier releases of ``name`` (see
        :meth:`Catalogue.publish`)."""
        with self.lock():
            catalogue = self.catalogue(("targets", "snapshot", "timestamp"))
            return catalogue.publish(
                bundle_dir,
                name=name,
                version=version,
                platform=platform,
                regions=regions,
                min_agent_version=min_agent_version,
                release=release,
                signatures=signatures,
                deltas=deltas,
            )

    def assign(self, sites: Iterable[str], name: str, version: str) -> Release:
        """Point ``sites`` at a released bundle in the director (online keys)."""
        with self.lock():
            release = self.catalogue().get(name, version)
            if release is None:
                raise PublishError(f"{name}@{version} is not released")
            self.director(("targets", "snapshot", "timestamp")).assign(sites, release)
            return release

    def apply(
        self,
        assign: Mapping[str, Iterable[str]],
        unassign: Iterable[str] = (),
        *,
        locked: bool = False,
    ) -> dict[str, Release]:
        """Point groups of sites at released bundles (``name@version`` → sites) and remove
        the desired state of ``unassign``, in one director signing. Returns the releases.
        ``locked``: the caller holds :meth:`lock` already (to save what it wrote under it)."""
        with contextlib.nullcontext() if locked else self.lock():
            catalogue = self.catalogue()
            releases = {}
            for bundle in assign:
                name, _, version = bundle.partition("@")
                release = catalogue.get(name, version) if name and version else None
                if release is None:
                    raise PublishError(f"{bundle} is not released")
                releases[bundle] = release
            self.director(("targets", "snapshot", "timestamp")).apply(
                [(releases[b], sites) for b, sites in assign.items()], unassign
            )
            return releases

    def refresh(self) -> dict[str, RefreshReport]:
        """Re-sign, in both repositories, what is close to expiry and whose keys are here."""
        reports = {}
        with self.lock():
            for repository in REPOSITORIES:
                writer = self.writer(repository)
                root = writer.root()
                for role in TOP_LEVEL_ROLES:
                    keyids = set(root.roles[role].keyids)
                    signers = self.keys.signers(repository, role, keyids)
                    if len(signers) >= root.roles[role].threshold:
                        writer.set_signers(role, signers)
                reports[repository] = writer.refresh()
        return reports
