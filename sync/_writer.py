"""Writing a TUF repository: new versions, signatures, snapshot and timestamp, rotations.

:class:`RepositoryWriter` is python-tuf's ``tuf.repository.Repository`` over a
:class:`~fogline.sync._store.Store`: ``edit(role)`` opens a role's newest version, and
closing it bumps the version, sets the expiry from :class:`Expiry`, signs with the keys
at hand and refuses to write what would not verify (a role short of its threshold is a
:class:`SigningKeyError`, not a file no site accepts). ``do_snapshot``/``do_timestamp``
come from python-tuf. Keys are handed in; where they live is the caller's business.

Both repositories are built on it: the catalogue (:class:`fogline.sync.Catalogue`) and the
director (:class:`fogline.sync.Director`), whose per-site entries live in succinct hash-bin
delegations (TAP 15) so that one site's change re-signs one small bin, not a file that
lists every site.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    SuccinctRoles,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from fogline.sync._store import Store
from fogline.sync._tuf_errors import tuf_errors
from fogline.sync.errors import MetadataError, PublishError, SigningKeyError

__all__ = [
    "BIN_PREFIX",
    "TOP_LEVEL_ROLES",
    "Expiry",
    "RefreshReport",
    "RepositoryWriter",
]

TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")
BIN_PREFIX = "sites"
_SERIALIZER = JSONSerializer(compact=True)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed, in days. Delegated
    roles (the director's site bins) use ``targets_days``."""

    root_days: float = 365.0
    targets_days: float = 90.0
    snapshot_days: float = 7.0
    timestamp_days: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"expiry {f.name} must be a positive number, got {value!r}")
            if value > 3660:
                raise ValueError(f"expiry {f.name}={value} is over ten years")

    def period(self, role: str) -> timedelta:
        days = {
            "root": self.root_days,
            "snapshot": self.snapshot_days,
            "timestamp": self.timestamp_days,
        }.get(role, self.targets_days)
        return timedelta(days=days)

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Expiry:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown expiry settings {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RefreshReport:
    """What :meth:`RepositoryWriter.refresh` re-signed, and which roles were due but whose
    keys were not at hand (offline keys: the operator signs those)."""

    resigned: tuple[str, ...]
    due_without_key: tuple[str, ...]


class RepositoryWriter(Repository):
    """python-tuf's repository model over a :class:`Store`, signing with ``signers``
    (role name → signers; the director's bins are signed by the ``targets`` signers)."""

    def __init__(
        self,
        store: Store,
        signers: Mapping[str, Sequence[Signer]] | None = None,
        expiry: Expiry | None = None,
        *,
        name: str = "repository",
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.name = name
        self.expiry = expiry or Expiry()
        self._signers: dict[str, list[Signer]] = {r: list(s) for r, s in (signers or {}).items()}
        self._previous_root_signers: list[Signer] = []
        self._now = now
        self._latest: dict[str, Metadata[Any]] = {}
        self._snapshot_info = MetaFile(1)
        self._targets_infos: dict[str, MetaFile] = {}
        timestamp = self._load("metadata/timestamp.json", "timestamp")
        if timestamp is not None:
            # _load checked each role's type.
            self._snapshot_info = copy.deepcopy(cast(Timestamp, timestamp.signed).snapshot_meta)
            snapshot = self._load(
                f"metadata/{self._snapshot_info.version}.snapshot.json", "snapshot"
            )
            if snapshot is None:
                raise MetadataError(f"{name}: the snapshot the timestamp names is missing")
            self._targets_infos = copy.deepcopy(cast(Snapshot, snapshot.signed).meta)

    # ------------------------------------------------------------ tuf.repository.Repository

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return self._targets_infos

    @property
    def snapshot_info(self) -> MetaFile:
        return self._snapshot_info

    @property
    def exists(self) -> bool:
        return self.store.read("metadata/root.json") is not None

    def open(self, role: str) -> Metadata[Any]:
        if role in self._latest:
            return copy.deepcopy(self._latest[role])
        if role == "root":
            found = self._load("metadata/root.json", role)
        elif role == "timestamp":
            found = self._load("metadata/timestamp.json", role)
        elif role == "snapshot":
            found = (
                self._load(f"metadata/{self._snapshot_info.version}.snapshot.json", role)
                if self.store.read("metadata/timestamp.json") is not None
                else None
            )
        else:
            info = self._targets_infos.get(f"{role}.json")
            found = (
                None if info is None else self._load(f"metadata/{info.version}.{role}.json", role)
            )
        if found is not None:
            self._latest[role] = found
            return copy.deepcopy(found)
        signed: Signed
        if role == "root":
            signed = Root(consistent_snapshot=True)
        elif role == "timestamp":
            signed = Timestamp()
        elif role == "snapshot":
            signed = Snapshot()
        else:
            signed = Targets()
        signed.version = 0  # close() makes it 1
        return Metadata(signed)

    def close(self, role: str, md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.period(role)
        md.signatures.clear()
        signers = self._signers_for(role)
        if role == "root":
            signers = [*signers, *self._previous_root_signers]
        with tuf_errors(f"{self.name}: signing {role}"):
            for signer in signers:
                md.sign(signer, append=True)
        self._check_verifies(role, md)
        data = md.to_bytes(_SERIALIZER)
        version = md.signed.version
        if role == "root":
            self.store.write(f"metadata/{version}.root.json", data)
            self.store.write("metadata/root.json", data)
        elif role == "timestamp":
            self.store.write("metadata/timestamp.json", data)
        elif role == "snapshot":
            self.store.write(f"metadata/{version}.snapshot.json", data)
            self._snapshot_info = _metafile(version, data)
        else:
            self.store.write(f"metadata/{version}.{role}.json", data)
            self._targets_infos[f"{role}.json"] = _metafile(version, data)
        self._latest[role] = md

    # ------------------------------------------------------------------------ helpers

    def _load(self, path: str, role: str) -> Metadata[Any] | None:
        data = self.store.read(path)
        if data is None:
            return None
        with tuf_errors(f"{self.name}: reading {path}"):
            md = Metadata[Any].from_bytes(data)
        expected = {"root": Root, "timestamp": Timestamp, "snapshot": Snapshot}.get(role, Targets)
        if not isinstance(md.signed, expected):
            raise MetadataError(f"{self.name}: {path} holds {md.signed.type}, not {role}")
        return md

    def _signers_for(self, role: str) -> list[Signer]:
        return self._signers.get(role if role in TOP_LEVEL_ROLES else "targets", [])

    def _check_verifies(self, role: str, md: Metadata[Any]) -> None:
        """Only metadata a site would accept is written."""
        if role == "root":
            new_root = cast(Root, md.signed)
            previous = self.root() if self.exists or "root" in self._latest else None
            both = new_root.get_root_verification_result(previous, md.signed_bytes, md.signatures)
            if not both:
                raise SigningKeyError(
                    f"{self.name}: root v{md.signed.version} needs the threshold of the old and "
                    f"the new root keys; {len(both.first.signed)} of "
                    f"{both.first.threshold} and {len(both.second.signed)} of "
                    f"{both.second.threshold} are at hand"
                )
            return
        delegator: Root | Targets = self.root() if role in TOP_LEVEL_ROLES else self.targets()
        result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result:
            raise SigningKeyError(
                f"{self.name}: {role} needs {result.threshold} signature(s) from its keys; "
                f"{len(result.signed)} of its keys are at hand"
            )

    def set_signers(self, role: str, signers: Sequence[Signer]) -> None:
        self._signers[role] = list(signers)

    def has_signers(self, role: str) -> bool:
        return bool(self._signers_for(role))

    def bins(self) -> SuccinctRoles | None:
        delegations = self.targets().delegations
        return None if delegations is None else delegations.succinct_roles

    def commit(self) -> None:
        """A new snapshot and timestamp for whatever targets changed."""
        self.do_snapshot()
        self.do_timestamp()

    # --------------------------------------------------------------------------- setup

    def initialise(
        self,
        *,
        root_signers: Sequence[Signer],
        root_threshold: int,
        role_signers: Mapping[str, Signer],
        bins_bit_length: int | None = None,
    ) -> None:
        """Root v1 with these keys, empty targets (with ``2**bins_bit_length`` site bins
        delegated to the targets keys, for the director), snapshot and timestamp."""
        if self.exists:
            raise PublishError(f"{self.name} is already initialised")
        if not 1 <= root_threshold <= len(root_signers):
            raise ValueError(
                f"root threshold {root_threshold} must lie in [1, {len(root_signers)}] "
                "(the number of root keys)"
            )
        missing = {"targets", "snapshot", "timestamp"} - set(role_signers)
        if missing:
            raise ValueError(f"keys for {sorted(missing)} are missing")
        self._signers = {"root": list(root_signers)}
        self._signers.update({role: [s] for role, s in role_signers.items()})
        with self.edit_root() as root:
            for signer in root_signers:
                root.add_key(signer.public_key, "root")
            root.roles["root"].threshold = root_threshold
            for role, signer in role_signers.items():
                root.add_key(signer.public_key, role)
        delegations = (
            None
            if bins_bit_length is None
            else _bin_delegations([role_signers["targets"]], bins_bit_length)
        )
        with self.edit_targets() as targets:
            targets.delegations = delegations
        if delegations is not None and delegations.succinct_roles is not None:
            for name in delegations.succinct_roles.get_roles():
                with self.edit_targets(name):
                    pass
        self.commit()

    # ------------------------------------------------------------------------ rotation

    def rotate(self, role: str, signers: Sequence[Signer], threshold: int = 1) -> int:
        """Replace ``role``'s keys by ``signers`` (``threshold`` of them must sign); returns
        the new root version. A new root is signed by the old root threshold and the new
        one; a rotated targets key re-signs targets and every site bin."""
        if role not in TOP_LEVEL_ROLES:
            raise ValueError(f"role {role!r} must be one of {', '.join(TOP_LEVEL_ROLES)}")
        if not 1 <= threshold <= len(signers):
            raise ValueError(f"threshold {threshold} must lie in [1, {len(signers)}]")
        old = list(self._signers.get(role, []))
        if role == "root":
            self._previous_root_signers = old
        try:
            self._signers[role] = list(signers)
            with self.edit_root() as root:
                for keyid in list(root.roles[role].keyids):
                    root.revoke_key(keyid, role)
                for signer in signers:
                    root.add_key(signer.public_key, role)
                root.roles[role].threshold = threshold
        except BaseException:
            self._signers[role] = old
            raise
        finally:
            self._previous_root_signers = []
        if role == "targets":
            bins = self.bins()
            with self.edit_targets() as targets:
                if bins is not None:
                    targets.delegations = _bin_delegations(list(signers), bins.bit_length)
            if bins is not None:
                for name in bins.get_roles():
                    with self.edit_targets(name):
                        pass
        if role == "snapshot":
            self.do_snapshot(force=True)
        else:
            self.do_snapshot()
        self.do_timestamp(force=role in ("snapshot", "timestamp"))
        return self.root().version

    # ------------------------------------------------------------------------- refresh

    def refresh(self) -> RefreshReport:
        """Re-sign every role with less than half its expiry period left, where its keys
        are at hand; snapshot and timestamp follow whatever changed."""
        now = self._now()
        resigned: list[str] = []
        due_without_key: list[str] = []

        def due(role: str) -> bool:
            expires: datetime = self.open(role).signed.expires
            return expires - now < self.expiry.period(role) / 2

        roles: list[str] = ["root", "targets"]
        bins = self.bins()
        if bins is not None:
            roles.extend(bins.get_roles())
        for role in roles:
            if not due(role):
                continue
            needed = self._signers_for(role)
            if not needed:
                due_without_key.append(role)
                continue
            if role == "root":
                self._previous_root_signers = []
                with self.edit_root():
                    pass
            else:
                with self.edit_targets(role):
                    pass
            resigned.append(role)
        for role in ("snapshot", "timestamp"):
            forced = due(role)
            if forced and not self.has_signers(role):
                due_without_key.append(role)
                continue
            changed = (
                self.do_snapshot(force=forced)[0]
                if role == "snapshot"
                else self.do_timestamp(force=forced)[0]
            )
            if changed:
                resigned.append(role)
        return RefreshReport(tuple(resigned), tuple(due_without_key))


def _bin_delegations(signers: Iterable[Signer], bit_length: int) -> Delegations:
    keys = {s.public_key.keyid: s.public_key for s in signers}
    return Delegations(
        keys=keys,
        roles=None,
        succinct_roles=SuccinctRoles(
            keyids=list(keys), threshold=1, bit_length=bit_length, name_prefix=BIN_PREFIX
        ),
    )


def _metafile(version: int, data: bytes) -> MetaFile:
    return MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})
