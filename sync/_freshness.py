"""How fresh a site's trusted metadata is: per repository, the version and ``expires`` of
each role in python-tuf's cache, and whether any has expired (``stale``).

python-tuf writes to its cache only metadata it verified, so reading it back needs no
signature check: :func:`freshness_of` is a pure function over the cached files' bytes and
a time passed in; :func:`read_freshness` is the adapter that reads ``trust/<repository>/``.
A stale site keeps what it has and runs it; its next refresh raises ``ExpiredError`` until
the repository (or an export) offers newer metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api.metadata import Metadata

from fogline.sync._tuf_errors import tuf_errors
from fogline.sync.errors import MetadataError, StorageError

__all__ = ["Freshness", "RepositoryFreshness", "RoleFreshness", "freshness_of", "read_freshness"]

REPOSITORIES = ("catalogue", "director")
REQUIRED_ROLES = ("root", "timestamp", "snapshot", "targets")
_MAX_CACHED_BYTES = 8 * 1024 * 1024


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RoleFreshness:
    """One cached role: its version, when it expires, and whether it has."""

    role: str
    version: int
    expires: datetime
    expired: bool

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "expires": _iso(self.expires), "expired": self.expired}


@dataclass(frozen=True)
class RepositoryFreshness:
    """One repository's cached roles; ``missing`` names the top-level roles never
    fetched (a site that never refreshed)."""

    repository: str
    roles: Mapping[str, RoleFreshness]
    missing: tuple[str, ...]

    @property
    def stale(self) -> bool:
        return bool(self.missing) or any(r.expired for r in self.roles.values())

    @property
    def expires(self) -> datetime | None:
        """When the first of its roles expires (or expired)."""
        return min((r.expires for r in self.roles.values()), default=None)

    def to_dict(self) -> dict[str, Any]:
        expires = self.expires
        return {
            "stale": self.stale,
            "expires": None if expires is None else _iso(expires),
            "missing": list(self.missing),
            "roles": {name: r.to_dict() for name, r in sorted(self.roles.items())},
        }


@dataclass(frozen=True)
class Freshness:
    """Both repositories' freshness at ``now``."""

    now: datetime
    repositories: Mapping[str, RepositoryFreshness]

    @property
    def stale(self) -> bool:
        return any(r.stale for r in self.repositories.values())

    @property
    def expires(self) -> datetime | None:
        """When the first cached role of either repository expires (or expired)."""
        return min(
            (e for r in self.repositories.values() if (e := r.expires) is not None), default=None
        )

    def to_dict(self) -> dict[str, Any]:
        expires = self.expires
        return {
            "now": _iso(self.now),
            "stale": self.stale,
            "expires": None if expires is None else _iso(expires),
            "repositories": {n: r.to_dict() for n, r in self.repositories.items()},
        }


def freshness_of(cached: Mapping[str, Mapping[str, bytes]], now: datetime) -> Freshness:
    """Freshness from the cached metadata (repository → role name → bytes) at ``now``
    (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    repositories = {}
    for repository in REPOSITORIES:
        roles = {}
        for role, data in sorted(cached.get(repository, {}).items()):
            with tuf_errors(f"{repository}: the cached {role}"):
                signed = Metadata[Any].from_bytes(data).signed
            if role in REQUIRED_ROLES and signed.type != role:
                raise MetadataError(f"{repository}: the cached {role} holds {signed.type}")
            roles[role] = RoleFreshness(
                role=role,
                version=signed.version,
                expires=signed.expires,
                expired=signed.is_expired(now),
            )
        missing = tuple(r for r in REQUIRED_ROLES if r not in roles)
        repositories[repository] = RepositoryFreshness(repository, roles, missing)
    return Freshness(now=now, repositories=repositories)


def _cached_roles(directory: Path) -> dict[str, bytes]:
    """python-tuf's cache: ``root.json`` (a link to the newest of ``root_history/``),
    ``timestamp.json``, ``snapshot.json``, ``targets.json`` and delegated roles
    (``<quoted name>.json``)."""
    out: dict[str, bytes] = {}
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError as exc:
        raise StorageError(f"cannot list {directory}: {exc.strerror or exc}") from exc
    for path in paths:
        try:
            if path.stat().st_size > _MAX_CACHED_BYTES:
                raise StorageError(f"{path} is over {_MAX_CACHED_BYTES} bytes")
            out[parse.unquote(path.stem)] = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return out


def read_freshness(state_dir: Path, now: datetime | None = None) -> Freshness:
    """The freshness of the trusted metadata in a site's state directory at ``now``
    (default: the wall clock, as python-tuf checks expiry)."""
    trust = Path(state_dir) / "trust"
    if not (Path(state_dir) / "site.json").is_file():
        raise StorageError(f"{state_dir} is not an enrolled site: no site.json")
    cached = {repo: _cached_roles(trust / repo) for repo in REPOSITORIES}
    return freshness_of(cached, now if now is not None else datetime.now(UTC))
