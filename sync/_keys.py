"""Ed25519 signing keys in files that only their owner can read.

A key file is the private key as PEM (PKCS #8), written owner-only (0600) in a directory
only its owner may enter (0700), created with those modes rather than narrowed after, and
never logged. A key file others can read is refused when it is loaded, as ssh does. Key
rings lay keys out as ``<dir>/<repository>/<role>/<keyid>.pem``; the public halves are in
the repositories' root metadata.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner

from fogline.sync.errors import SigningKeyError, StorageError

__all__ = [
    "KeyRing",
    "generate_key",
    "make_private_dir",
    "read_key",
    "write_key",
    "write_private_file",
]

_MAX_KEY_FILE_BYTES = 16 * 1024


def generate_key() -> CryptoSigner:
    """A new Ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def make_private_dir(path: Path) -> Path:
    """``path`` and its missing parents, the last one made 0700 (an existing one is
    narrowed to 0700)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc
    return path


def write_private_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file created 0600 (never an existing one, never through a
    symbolic link), in a 0700 directory."""
    make_private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise StorageError(f"{path} already exists; it is not overwritten") from None
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def write_key(path: Path, signer: CryptoSigner) -> Path:
    """Write ``signer``'s private key to ``path``, owner-only."""
    return write_private_file(path, signer.private_bytes)


def read_key(path: Path) -> CryptoSigner:
    """The Ed25519 signer in key file ``path``; refused when others may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise SigningKeyError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot open key file {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SigningKeyError(
                f"key file {path} is open to others (mode {stat.S_IMODE(mode):04o}); "
                f"chmod 600 {path}"
            )
        data = fh.read(_MAX_KEY_FILE_BYTES + 1)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise SigningKeyError(f"key file {path} is too large to be a key")
    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The message of a failed parse never holds key material, but keep it generic.
        raise SigningKeyError(f"key file {path} is not an unencrypted PEM private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"key file {path} is not an Ed25519 key")
    return CryptoSigner(private)


class KeyRing:
    """Key files under ``root``: ``<repository>/<role>/<keyid>.pem``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, repository: str, role: str) -> Path:
        return self.root / repository / role

    def add(self, repository: str, role: str, signer: CryptoSigner) -> Path:
        make_private_dir(self.root)
        make_private_dir(self.root / repository)
        return write_key(self._dir(repository, role) / f"{signer.public_key.keyid}.pem", signer)

    def signers(
        self, repository: str, role: str, keyids: set[str] | None = None
    ) -> list[CryptoSigner]:
        """The signers of ``role`` found here, only those of ``keyids`` when given (keys
        a root no longer lists are of no use)."""
        where = self._dir(repository, role)
        try:
            paths = sorted(p for p in where.iterdir() if p.suffix == ".pem")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SigningKeyError(f"cannot list {where}: {exc.strerror or exc}") from exc
        found = []
        for path in paths:
            if keyids is not None and path.stem not in keyids:
                continue
            signer = read_key(path)
            if signer.public_key.keyid != path.stem:
                raise SigningKeyError(f"key file {path} holds key {signer.public_key.keyid[:12]}…")
            found.append(signer)
        return found

    def retire(self, repository: str, role: str, keep: set[str]) -> int:
        """Delete the key files of ``role`` whose key ids are not in ``keep``."""
        removed = 0
        where = self._dir(repository, role)
        if not where.is_dir():
            return 0
        for path in where.iterdir():
            if path.suffix == ".pem" and path.stem not in keep:
                try:
                    path.unlink()
                except OSError as exc:
                    raise StorageError(f"cannot remove {path}: {exc.strerror or exc}") from exc
                removed += 1
        return removed
