"""What the site runs, on disk, so that a restart after a crash at any point comes back on
a complete, verified bundle.

In the site's sync state directory::

    current.json    the bundle the agent runs and the one before it (name, version,
                    release, manifest SHA-256, each file's SHA-256, directory), replaced
                    whole (temporary file, fsync, rename, fsync of the directory) only
                    after a swap
    update.json     where the update stands (phase, desired, stale, last error), for
                    ``fogline agent status``
    update.lock     held (``fcntl.flock``) by the one updater of the site
    imports/        (0700) exports handed to the running agent (``fogline agent import``
                    while the agent holds the lock): ``<name>.tar``, written under a
                    dot-led temporary name and renamed; the agent answers each with
                    ``<name>.tar.result.json`` and then removes the export

At start the agent checks the current bundle's files against the hashes recorded here —
not TUF: TUF is never on the serving path — and falls back to the previous one when any
is missing or changed. A bundle directory is complete only once ``SiteSync.update`` moved
it into place (it stages under ``.partial-*``), so a crash mid-download leaves the
recorded bundles as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fogline.edge_agent.errors import UpdateError, UpdateLockedError

__all__ = [
    "IMPORTS",
    "ImportResult",
    "Installed",
    "InstalledBundle",
    "choose_bundle",
    "hand_over_import",
    "pending_imports",
    "prune_bundles",
    "read_import_result",
    "read_installed",
    "read_status",
    "result_path",
    "update_lock",
    "write_import_result",
    "write_installed",
    "write_status",
]

log = logging.getLogger("fogline.edge_agent")

CURRENT = "current.json"
STATUS = "update.json"
LOCK = "update.lock"
IMPORTS = "imports"
_RESULT_SUFFIX = ".result.json"
_IMPORT_SUFFIX = ".tar"
_FORMAT = 1
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class InstalledBundle:
    """One bundle the site ran: enough to check its files without TUF."""

    name: str
    version: str
    release: int
    manifest_sha256: str
    files: Mapping[str, str]  # file name -> SHA-256, the model files the site holds
    path: Path

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "release": self.release,
            "manifest_sha256": self.manifest_sha256,
            "files": dict(self.files),
            "path": str(self.path),
        }

    @classmethod
    def from_dict(cls, data: Any) -> InstalledBundle:
        if not isinstance(data, dict):
            raise TypeError("a bundle record must be an object")
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise TypeError("files must map names to SHA-256 digests")
        for key in ("name", "version", "manifest_sha256", "path"):
            if not isinstance(data[key], str):
                raise TypeError(f"{key} must be a string")
        release = data["release"]
        if isinstance(release, bool) or not isinstance(release, int):
            raise TypeError("release must be an integer")
        return cls(
            data["name"],
            data["version"],
            release,
            data["manifest_sha256"],
            files,
            Path(data["path"]),
        )

    def damage(self) -> str | None:
        """What is wrong with this bundle's files on disk, or None when every one is there
        with its recorded SHA-256."""
        wanted = {_MANIFEST: self.manifest_sha256, **self.files}
        for name, digest in wanted.items():
            if "/" in name or name.startswith("."):
                return f"{name!r} is not a file name"
            try:
                got = _sha256(self.path / name)
            except OSError as exc:
                return f"{name}: {exc.strerror or exc}"
            if got != digest:
                return f"{name} has SHA-256 {got[:12]}…, {digest[:12]}… was recorded"
        return None


@dataclass(frozen=True)
class Installed:
    """``current.json``: the bundle the agent runs and the one before it."""

    current: InstalledBundle | None = None
    previous: InstalledBundle | None = None

    def after_swap(self, new: InstalledBundle) -> Installed:
        """The record once ``new`` runs: the current one becomes the previous, unless
        ``new`` is the same release (then the previous stays)."""
        if self.current is not None and self.current.manifest_sha256 == new.manifest_sha256:
            return Installed(new, self.previous)
        return Installed(new, self.current)

    def keep(self) -> set[Path]:
        return {b.path for b in (self.current, self.previous) if b is not None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_installed(state_dir: Path) -> Installed:
    """``current.json`` of ``state_dir``; empty when there is none. A damaged file is
    logged and read as empty: the agent then runs its configured bundle."""
    path = Path(state_dir) / CURRENT
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Installed()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.error("%s is unreadable (%s): running the configured bundle", path, exc)  # noqa: TRY400
        return Installed()
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        log.error("%s is not a format %d record: running the configured bundle", path, _FORMAT)
        return Installed()
    try:
        return Installed(
            *(
                None if data.get(k) is None else InstalledBundle.from_dict(data[k])
                for k in ("current", "previous")
            )
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.error("%s is damaged (%s): running the configured bundle", path, exc)  # noqa: TRY400
        return Installed()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` into ``path`` whole: a temporary file, fsync, rename, fsync of the
    directory (so the rename itself survives a power cut). Owner-only."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise UpdateError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_installed(state_dir: Path, installed: Installed) -> None:
    _write_json(
        Path(state_dir) / CURRENT,
        {
            "format": _FORMAT,
            "current": None if installed.current is None else installed.current.to_dict(),
            "previous": None if installed.previous is None else installed.previous.to_dict(),
        },
    )


def choose_bundle(state_dir: Path) -> InstalledBundle | None:
    """The bundle to start on: the current one when its files match their hashes, else
    the previous one when its do, else None (run the configured bundle)."""
    installed = read_installed(state_dir)
    for which, bundle in (("current", installed.current), ("previous", installed.previous)):
        if bundle is None:
            continue
        damage = bundle.damage()
        if damage is None:
            if which == "previous":
                log.warning("falling back to the previous bundle %s", bundle.id)
            return bundle
        log.error("the %s bundle %s is damaged (%s); not running it", which, bundle.id, damage)
    return None


def prune_bundles(state_dir: Path, keep: set[Path]) -> list[Path]:
    """Remove every bundle directory under ``bundles/`` but those in ``keep`` (the
    current and the previous), and the staging left by an interrupted download. Only the
    holder of the update lock calls this. Returns what was removed."""
    removed: list[Path] = []
    root = Path(state_dir) / "bundles"
    kept = {p.resolve() for p in keep}
    if not root.is_dir():
        return removed
    for name_dir in sorted(root.iterdir()):
        if not name_dir.is_dir() or name_dir.is_symlink():
            continue
        for version_dir in sorted(name_dir.iterdir()):
            if version_dir.resolve() in kept or not version_dir.is_dir():
                continue
            shutil.rmtree(version_dir, ignore_errors=True)
            removed.append(version_dir)
        with contextlib.suppress(OSError):
            name_dir.rmdir()  # only when empty
    return removed


def write_status(state_dir: Path, status: Mapping[str, Any]) -> None:
    _write_json(Path(state_dir) / STATUS, {"format": _FORMAT, **status})


def read_status(state_dir: Path) -> dict[str, Any]:
    """``update.json``, or an empty dict when there is none or it is unreadable."""
    try:
        data = json.loads((Path(state_dir) / STATUS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def update_lock(state_dir: Path) -> Iterator[None]:
    """Be the site's one updater while the block runs: ``update.lock`` under
    ``fcntl.flock`` (released by the kernel when the process dies, however it dies).
    Another holder raises :class:`UpdateLockedError` at once, naming its pid."""
    path = Path(state_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UpdateError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UpdateLockedError(
                f"another updater (pid {holder}) holds {path}: one update at a time per site"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ imports handed over

ImportOutcome = Literal["ok", "refused", "error"]
_OUTCOMES = ("ok", "refused", "error")


@dataclass(frozen=True)
class ImportResult:
    """How one import ended: ``ok`` (installed, or ``already_installed``), ``refused``
    (verification refused the export, or its bundle does not run here: nothing changed)
    or ``error`` (a file could not be read or written). ``bundle`` is the bundle's id
    once verified, ``release`` its release fields, ``path`` its directory; ``message``
    says what happened in one line."""

    outcome: ImportOutcome
    file: str
    message: str
    bundle: str | None = None
    release: Mapping[str, Any] | None = None
    path: str | None = None
    already_installed: bool = False
    previous: str | None = None
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def __post_init__(self) -> None:
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(_OUTCOMES)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "file": self.file,
            "message": self.message,
            "bundle": self.bundle,
            "release": None if self.release is None else dict(self.release),
            "path": self.path,
            "already_installed": self.already_installed,
            "previous": self.previous,
            "time_ms": self.time_ms,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ImportResult:
        if not isinstance(data, dict):
            raise TypeError("an import result must be an object")
        for key in ("outcome", "file", "message"):
            if not isinstance(data.get(key), str):
                raise TypeError(f"{key} must be a string")
        for key in ("bundle", "path", "previous"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise TypeError(f"{key} must be a string or null")
        release = data.get("release")
        if release is not None and not isinstance(release, dict):
            raise TypeError("release must be an object or null")
        when = data.get("time_ms", 0)
        if isinstance(when, bool) or not isinstance(when, int):
            raise TypeError("time_ms must be an integer")
        return cls(
            outcome=data["outcome"],
            file=data["file"],
            message=data["message"],
            bundle=data.get("bundle"),
            release=release,
            path=data.get("path"),
            already_installed=data.get("already_installed") is True,
            previous=data.get("previous"),
            time_ms=when,
        )


def _imports_dir(state_dir: Path) -> Path:
    """``<state_dir>/imports``, made owner-only (an existing one is narrowed to 0700)."""
    path = Path(state_dir) / IMPORTS
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise UpdateError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return path


def result_path(handed: Path) -> Path:
    """Where the agent writes the result of the export handed over at ``handed``."""
    return handed.with_name(handed.name + _RESULT_SUFFIX)


def hand_over_import(state_dir: Path, file: Path) -> Path:
    """Copy the export ``file`` into ``<state_dir>/imports/`` for the running agent:
    written whole under a dot-led name (owner-only, fsync), then renamed, so the agent
    never sees half of it. Returns its path there."""
    folder = _imports_dir(state_dir)
    name = f"{time.time_ns()}-{os.getpid()}{_IMPORT_SUFFIX}"
    tmp = folder / f".{name}.partial"
    try:
        with Path(file).open("rb") as src:
            try:
                with tmp.open("xb") as out:
                    os.fchmod(out.fileno(), 0o600)
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, folder / name)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise UpdateError(
                    f"cannot hand {file} over in {folder}: {exc.strerror or exc}"
                ) from exc
    except OSError as exc:
        raise UpdateError(f"cannot read {file}: {exc.strerror or exc}") from exc
    return folder / name


def pending_imports(state_dir: Path) -> list[Path]:
    """The exports waiting in ``<state_dir>/imports/``, oldest name first: entries not
    dot-led and not results. A symbolic link is among them (the import refuses it);
    directories are not. Made (owner-only) when missing."""
    folder = _imports_dir(state_dir)
    out: list[Path] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise UpdateError(f"cannot list {folder}: {exc.strerror or exc}") from exc
    for name in names:
        if name.startswith(".") or name.endswith(_RESULT_SUFFIX):
            continue
        try:
            mode = (folder / name).lstat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UpdateError(f"cannot read {folder / name}: {exc.strerror or exc}") from exc
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            out.append(folder / name)
    return out


def write_import_result(handed: Path, result: ImportResult) -> Path:
    path = result_path(handed)
    _write_json(path, {"format": _FORMAT, **result.to_dict()})
    return path


def read_import_result(handed: Path) -> ImportResult | None:
    """The result written for ``handed``, or None while there is none."""
    path = result_path(handed)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpdateError(f"{path} is unreadable: {exc}") from exc
    try:
        return ImportResult.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise UpdateError(f"{path} is not an import result: {exc}") from exc
