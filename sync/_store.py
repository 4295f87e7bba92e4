"""Where a repository's files live: a directory (served over HTTP as it is) or memory.

A repository is a tree of relative paths::

    metadata/1.root.json, 2.root.json, …   every root version (sites walk them one by one)
    metadata/root.json                     a copy of the newest root, to provision sites
    metadata/timestamp.json                the only file rewritten in place
    metadata/<v>.snapshot.json             consistent snapshots: every version kept
    metadata/<v>.targets.json, <v>.sites-<bin>.json
    targets/<name>/<version>/<sha256>.<file>   catalogue artifacts, named by their hash

Everything but ``timestamp.json`` and ``root.json`` is written once under a new name, so
a writer that stops half-way leaves files nothing points to, never a mixed state.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

from fogline.sync._names import check_target_path
from fogline.sync.errors import StorageError

__all__ = ["DirectoryStore", "MemoryStore", "Store"]


class Store(Protocol):
    """Relative path → bytes, as a repository's files are served."""

    def read(self, path: str) -> bytes | None:
        """The file's bytes, ``None`` when there is none."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Write (or atomically replace) one file."""
        ...


class MemoryStore:
    """A repository held in a dict (``files``), for tests and in-process serving."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def write(self, path: str, data: bytes) -> None:
        self.files[check_target_path(path)] = bytes(data)


class DirectoryStore:
    """A repository in a directory; every write lands whole (temporary file, fsync,
    rename), so an HTTP server in front of it never serves half a file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, path: str) -> Path:
        return self.root / check_target_path(path)

    def read(self, path: str) -> bytes | None:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(path)}: {exc.strerror or exc}") from exc

    def write(self, path: str, data: bytes) -> None:
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
