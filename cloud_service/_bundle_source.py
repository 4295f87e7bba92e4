"""Where the cloud gets the cloud part of a bundle version it was not given at start, and
which versions the fleet wants.

:class:`CatalogueSource` reads a local catalogue (the ``catalogue/`` of a sync home, or a
copy of it): for ``name@version`` it verifies the catalogue's signed metadata from its
trusted root (:func:`fogline.sync.trusted_targets`), finds the release, checks the
manifest and the cloud model against the signed lengths and SHA-256
(:func:`~fogline.sync.manifest_files`, :func:`~fogline.sync.check_file`,
:func:`~fogline.sync.cloud_files`) and writes them into a bundle directory in its cache::

    <cache>/<name>/<version>/manifest.json   the released manifest, as signed
    <cache>/<name>/<version>/<cloud model>   the cloud part

The directory is staged under a temporary name and renamed into place, so a refused or
interrupted load leaves nothing the next one could take for a bundle. A cached directory
is used again only when its manifest is the signed one and its files match it.

``director_wanted``, ``fleet_wanted`` and ``union_wanted`` say which bundle versions are
wanted (see :mod:`._bundle_loads`): every site's desired bundle in the director's signed
metadata, every site's running and desired bundle in the fleet store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Set
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fogline.cloud_service.errors import BundleNotReleasedError, BundleSourceError
from fogline.sync import Bundle, SyncError

if TYPE_CHECKING:
    from fogline.sync import FleetStore

__all__ = [
    "BundleSource",
    "CatalogueSource",
    "Wanted",
    "director_wanted",
    "fleet_wanted",
    "union_wanted",
]

log = logging.getLogger("fogline.cloud.bundles")

#: Returns the bundle ids (``name@version``) some site runs or is told to run.
Wanted = Callable[[], Set[str]]

_MANIFEST = "manifest.json"


class BundleSource(Protocol):
    """Provides the cloud part of a bundle version by id, as a loadable :class:`Bundle`."""

    def fetch(self, bundle_id: str) -> Bundle:
        """The bundle ``name@version``; :class:`BundleNotReleasedError` when it was never
        released, :class:`BundleSourceError` when it cannot be had."""
        ...

    def forget(self, bundle_id: str) -> None:
        """The version was unloaded: drop what was kept of it (a cache); never raises."""
        ...


class CatalogueSource:
    """Cloud parts from a local catalogue repository (see the module docstring).

    ``catalogue`` is the repository directory (``SyncHome.repository_dir("catalogue")``);
    ``trusted_root`` the root metadata to verify it from (bytes or a file; default: the
    repository's first root, ``metadata/1.root.json``). Safe to call from several threads
    for different ids; the caller loads one id at a time."""

    def __init__(
        self,
        catalogue: str | Path,
        cache_dir: str | Path,
        *,
        trusted_root: bytes | str | Path | None = None,
    ) -> None:
        self.catalogue = Path(catalogue)
        self.cache_dir = Path(cache_dir)
        if trusted_root is None or isinstance(trusted_root, bytes):
            self._root = trusted_root
        else:
            try:
                self._root = Path(trusted_root).read_bytes()
            except OSError as exc:
                raise BundleSourceError(
                    f"cannot read the catalogue's trusted root {trusted_root}: "
                    f"{exc.strerror or exc}"
                ) from exc

    def __repr__(self) -> str:
        return f"CatalogueSource({str(self.catalogue)!r})"

    def fetch(self, bundle_id: str) -> Bundle:
        from fogline.sync import (
            DirectoryStore,
            check_file,
            cloud_files,
            manifest_files,
            trusted_targets,
        )
        from fogline.sync._release import file_path

        name, sep, version = bundle_id.rpartition("@")
        where = f"the catalogue {self.catalogue}"
        if not sep or not name:
            raise BundleNotReleasedError(bundle_id, where)
        try:
            trusted = trusted_targets(
                DirectoryStore(self.catalogue), name=where, trusted_root=self._root
            )
            try:
                release = trusted.release(name, version)
            except ValueError:  # not a name a release can have
                release = None
            if release is None:
                raise BundleNotReleasedError(bundle_id, where)
            final = self.cache_dir / release.name / release.version
            cached = self._cached(final, release.sha256)
            if cached is not None:
                return cached
            manifest = trusted.read(trusted.targets[release.path])
            files = manifest_files(manifest, release)
            contents: dict[str, bytes] = {}
            for fname in sorted(cloud_files(manifest, release, files)):
                entry = check_file(
                    release, files[fname], trusted.get(file_path(name, version, fname))
                )
                contents[fname] = trusted.read(entry)
        except SyncError as exc:
            raise BundleSourceError(f"bundle {bundle_id}: {exc}") from exc
        return self._materialize(bundle_id, final, manifest, contents)

    def forget(self, bundle_id: str) -> None:
        """Remove the cached copy of an unloaded version (a later fetch verifies and writes
        it again): the cache holds what is served, not every version ever served."""
        name, sep, version = bundle_id.rpartition("@")
        if (
            not sep
            or not name
            or not version
            or "/" in bundle_id
            or name.startswith(".")
            or version.startswith(".")
        ):
            return
        folder = self.cache_dir / name / version
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot remove the cached copy %s: %s", folder, exc.strerror or exc)

    @staticmethod
    def _cached(final: Path, manifest_sha256: str) -> Bundle | None:
        """The cached bundle at ``final`` if its manifest is the signed one and its files
        match it; else None."""
        try:
            data = (final / _MANIFEST).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != manifest_sha256:
            return None
        try:
            return Bundle.load(final, part="cloud")
        except SyncError:
            return None

    def _materialize(
        self, bundle_id: str, final: Path, manifest: bytes, contents: dict[str, bytes]
    ) -> Bundle:
        parent = final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".partial-{final.name}-", dir=parent))
        except OSError as exc:
            raise BundleSourceError(
                f"bundle {bundle_id}: cannot write to the cache {parent}: {exc.strerror or exc}"
            ) from exc
        try:
            for fname, data in (*contents.items(), (_MANIFEST, manifest)):
                with (staging / fname).open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            Bundle.load(staging, part="cloud")
            if final.exists():  # an earlier copy that no longer verifies
                shutil.rmtree(final)
            os.replace(staging, final)
        except SyncError as exc:
            raise BundleSourceError(f"bundle {bundle_id}: {exc}") from exc
        except OSError as exc:
            raise BundleSourceError(
                f"bundle {bundle_id}: cannot write {final}: {exc.strerror or exc}"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            return Bundle.load(final, part="cloud")
        except SyncError as exc:
            raise BundleSourceError(f"bundle {bundle_id}: {exc}") from exc


def director_wanted(home: str | Path, *, trusted_root: bytes | None = None) -> Wanted:
    """Every site's desired bundle in the director of the sync home ``home``, read from
    its signed metadata at each call (verified from ``trusted_root``, default the
    director's first root); a refusal raises :class:`BundleSourceError`."""
    from fogline.sync import DirectoryStore, SyncHome, trusted_targets

    directory = SyncHome(Path(home)).repository_dir("director")
    store = DirectoryStore(directory)

    def wanted() -> set[str]:
        try:
            trusted = trusted_targets(
                store, name=f"the director {directory}", trusted_root=trusted_root
            )
            return {release.id for release in trusted.desired().values()}
        except SyncError as exc:
            raise BundleSourceError(str(exc)) from exc

    return wanted


def fleet_wanted(store: FleetStore) -> Wanted:
    """Every bundle a site of the fleet store reports running, and every one it is told
    to run, at each call; a store that cannot be read raises its StorageError."""

    def wanted() -> set[str]:
        out: set[str] = set()
        for _site, bundle, desired in store.assignments():
            out.update(b for b in (bundle, desired) if b)
        return out

    return wanted


def union_wanted(*sources: Wanted) -> Wanted:
    """What any of ``sources`` wants; one that raises makes the whole call raise (a
    caller then unloads nothing on a partial view)."""

    def wanted() -> set[str]:
        out: set[str] = set()
        for source in sources:
            out |= set(source())
        return out

    return wanted
