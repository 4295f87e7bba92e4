"""The fleet store: sites, rollouts, each site's part in a rollout, nonces and an event log,
in a relational database through SQLAlchemy 2.

A SQLite file by default; PostgreSQL by URL (the database the cloud's result store uses).
Every table is prefixed ``fogline_sync_``:

``sites``          one row a site: region, fleet, public key, when it last reported and
                   what (running bundle, desired bundle, phase, health, stale, error)
``rollouts``       one row a rollout: its state as JSON and a version, bumped by every
                   save (two writers never overwrite each other's change unseen)
``rollout_sites``  one row per site and rollout: wave, state, previous bundle, times
``nonces``         the report nonces issued and not used yet (each good once)
``events``         append-only: what happened, when, to which rollout and site

Every SQLAlchemy error becomes a :class:`~fogline.sync.StorageError` in one place
(:meth:`FleetStore._errors`). Writes are idempotent (upserts keyed by site, rollout and
site), and the bulk ones take a whole fleet in a few statements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from fogline.sync._names import check_name
from fogline.sync._report import StatusReport
from fogline.sync._rollout import Observation, Rollout, SiteProgress
from fogline.sync.errors import RolloutError, StorageError

__all__ = ["PREFIX", "FleetStore", "SiteRecord", "StaleRolloutError"]

PREFIX = "fogline_sync_"
_CHUNK = 500
_NAME = sa.String(128)


class StaleRolloutError(StorageError):
    """A rollout was changed by another writer since it was loaded; load it again."""


@dataclass(frozen=True)
class SiteRecord:
    """A registered site and what its last status report said."""

    site: str
    region: str
    fleet: str
    public_key: Mapping[str, Any]
    registered_at: float
    last_seen: float | None = None
    bundle: str | None = None
    release: int | None = None
    manifest_sha256: str | None = None
    desired: str | None = None
    phase: str = "idle"
    health: Mapping[str, float] = field(default_factory=dict)
    stale: bool = False
    error: str | None = None

    def observation(self) -> Observation:
        return Observation(
            site=self.site,
            seen_at=self.last_seen,
            bundle=self.bundle,
            phase=self.phase,
            desired=self.desired,
            health=self.health,
            error=self.error,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "region": self.region,
            "fleet": self.fleet,
            "keyid": self.public_key.get("keyid"),
            "registered_at": self.registered_at,
            "last_seen": self.last_seen,
            "bundle": self.bundle,
            "release": self.release,
            "manifest_sha256": self.manifest_sha256,
            "desired": self.desired,
            "phase": self.phase,
            "health": dict(self.health),
            "stale": self.stale,
            "error": self.error,
        }


def _tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    return {
        "sites": sa.Table(
            f"{PREFIX}sites",
            metadata,
            sa.Column("site", _NAME, primary_key=True),
            sa.Column("region", _NAME, nullable=False),
            sa.Column("fleet", _NAME, nullable=False, index=True),
            sa.Column("public_key", sa.Text, nullable=False),
            sa.Column("registered_at", sa.Float, nullable=False),
            sa.Column("last_seen", sa.Float),
            sa.Column("bundle", sa.String(260)),
            sa.Column("release", sa.BigInteger),
            sa.Column("manifest_sha256", sa.String(64)),
            sa.Column("desired", sa.String(260)),
            sa.Column("phase", sa.String(16), nullable=False, default="idle"),
            sa.Column("health", sa.Text, nullable=False, default="{}"),
            sa.Column("stale", sa.Boolean, nullable=False, default=False),
            sa.Column("error", sa.Text),
        ),
        "rollouts": sa.Table(
            f"{PREFIX}rollouts",
            metadata,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("fleet", _NAME, nullable=False, index=True),
            sa.Column("bundle", sa.String(260), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("header", sa.Text, nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("started_at", sa.Float, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        ),
        "rollout_sites": sa.Table(
            f"{PREFIX}rollout_sites",
            metadata,
            sa.Column("rollout_id", sa.String(64), primary_key=True),
            sa.Column("site", _NAME, primary_key=True),
            sa.Column("wave", sa.Integer, nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("previous", sa.String(260)),
            sa.Column("assigned_at", sa.Float),
            sa.Column("active_since", sa.Float),
            sa.Column("reason", sa.Text),
            sa.Column("excused", sa.Boolean, nullable=False, default=False),
        ),
        "nonces": sa.Table(
            f"{PREFIX}nonces",
            metadata,
            sa.Column("site", _NAME, primary_key=True),
            sa.Column("nonce", sa.String(128), primary_key=True),
            sa.Column("issued_at", sa.Float, nullable=False),
        ),
        "events": sa.Table(
            f"{PREFIX}events",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("rollout_id", sa.String(64), index=True),
            sa.Column("site", _NAME),
            sa.Column("kind", sa.String(32), nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
        ),
    }


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class FleetStore:
    """The fleet's state in a database (see the module docstring). Thread-safe: share one
    per process."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            sa_url = sa.make_url(url)
        except (SQLAlchemyError, ValueError) as exc:
            raise ValueError(f"store URL {url!r} is invalid: {exc}") from None
        kwargs: dict[str, Any] = {}
        if sa_url.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False}
            if sa_url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = sa.create_engine(sa_url, **kwargs)
        except (SQLAlchemyError, ImportError) as exc:
            hint = " (pip install 'fogline[postgres]')" if isinstance(exc, ImportError) else ""
            raise StorageError(
                f"cannot use store URL {sa_url.render_as_string()}: {exc}{hint}"
            ) from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._metadata = sa.MetaData()
        self.t = _tables(self._metadata)
        if create:
            with self._errors("create the fleet tables"):
                self._metadata.create_all(self.engine, checkfirst=True)

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """The one place SQLAlchemy's errors become the sync package's own."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot {doing} in {self.url}: {exc}") from exc

    @contextmanager
    def _tx(self, doing: str) -> Iterator[Connection]:
        with self._errors(doing), self.engine.begin() as conn:
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def _upsert(
        self,
        conn: Connection,
        table: sa.Table,
        rows: Sequence[Mapping[str, Any]],
        keys: Sequence[str],
    ) -> None:
        if not rows:
            return
        ins = self._insert(table)
        update = {c: ins.excluded[c] for c in rows[0] if c not in keys}
        stmt = ins.on_conflict_do_update(index_elements=list(keys), set_=update)
        for chunk in _chunks(rows):
            conn.execute(stmt, list(chunk))

    def size_bytes(self) -> int:
        """What the fleet tables take on disk (the SQLite file, or PostgreSQL's relations)."""
        with self._errors("measure the store"), self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                database = self.engine.url.database
                if not database or database == ":memory:":
                    return 0
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                return Path(database).stat().st_size
            total = 0
            for table in self.t.values():
                total += int(
                    conn.execute(
                        sa.text("SELECT pg_total_relation_size(:t)"), {"t": table.name}
                    ).scalar_one()
                )
            return total

    # ---------------------------------------------------------------------------- sites

    def register_sites(
        self, sites: Iterable[tuple[str, str, str, Mapping[str, Any]]], now: float
    ) -> int:
        """Register ``(site, region, fleet, public_key)``s; a site already registered with
        the same key is updated (region, fleet) in place. A site registered with another
        key is refused (:class:`RolloutError`): a site key never changes behind the
        service's back. Returns how many sites were new."""
        rows: dict[str, dict[str, Any]] = {}
        for site, region, fleet, key in sites:
            check_name(site, "site")
            check_name(region, "region")
            check_name(fleet, "fleet")
            if not isinstance(key, Mapping) or not isinstance(key.get("keyid"), str):
                raise TypeError(f"the public key of site {site!r} has no keyid")
            rows[site] = {
                "site": site,
                "region": region,
                "fleet": fleet,
                "public_key": json.dumps(dict(key), sort_keys=True),
                "registered_at": now,
            }
        names = sorted(rows)
        sites_t = self.t["sites"]
        new = 0
        with self._tx("register sites") as conn:
            known: dict[str, str] = {}
            for chunk in _chunks(names):
                for site, key in conn.execute(
                    sa.select(sites_t.c.site, sites_t.c.public_key).where(sites_t.c.site.in_(chunk))
                ):
                    known[site] = key
            for site in names:
                if site in known and json.loads(known[site]) != json.loads(
                    rows[site]["public_key"]
                ):
                    raise RolloutError(
                        f"site {site!r} is registered with another key; a site key is never "
                        "replaced (enroll the site under a new name)"
                    )
            fresh = [rows[s] for s in names if s not in known]
            for chunk in _chunks(fresh):
                conn.execute(sa.insert(sites_t), list(chunk))
            new = len(fresh)
            moved = [
                {"b_site": s, "region": rows[s]["region"], "fleet": rows[s]["fleet"]}
                for s in names
                if s in known
            ]
            if moved:
                conn.execute(
                    sa.update(sites_t)
                    .where(sites_t.c.site == sa.bindparam("b_site"))
                    .values(region=sa.bindparam("region"), fleet=sa.bindparam("fleet")),
                    moved,
                )
        return new

    def site(self, name: str) -> SiteRecord | None:
        with self._errors("read a site"), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(self.t["sites"]).where(self.t["sites"].c.site == name)
            ).first()
        return None if row is None else _site(row)

    def sites(self, fleet: str | None = None) -> list[SiteRecord]:
        """Every site (of ``fleet``), by name."""
        stmt = sa.select(self.t["sites"]).order_by(self.t["sites"].c.site)
        if fleet is not None:
            stmt = stmt.where(self.t["sites"].c.fleet == fleet)
        with self._errors("read sites"), self.engine.connect() as conn:
            return [_site(row) for row in conn.execute(stmt)]

    def assignments(self) -> list[tuple[str, str | None, str | None]]:
        """Every site's name, the bundle it reports running and the one it is told to
        run: the two columns the cloud's tick and reconcile read, without the rest."""
        t = self.t["sites"]
        stmt = sa.select(t.c.site, t.c.bundle, t.c.desired).order_by(t.c.site)
        with self._errors("read sites"), self.engine.connect() as conn:
            return [(row.site, row.bundle, row.desired) for row in conn.execute(stmt)]

    def public_key(self, site: str) -> Mapping[str, Any] | None:
        t = self.t["sites"]
        with self._errors("read a site key"), self.engine.connect() as conn:
            value = conn.execute(sa.select(t.c.public_key).where(t.c.site == site)).scalar()
        return None if value is None else dict(json.loads(value))

    def record_reports(self, reports: Sequence[StatusReport], now: float) -> None:
        """What verified status reports say, as each site's latest state."""
        statement, rows = self._report_rows(reports, now)
        if not rows:
            return
        with self._tx("record status reports") as conn:
            conn.execute(statement, rows)

    def record_report_with_nonce(self, report: StatusReport, now: float) -> bool:
        """Use the report's nonce up and record what it says, in one transaction; false,
        with nothing written, when the nonce was never issued to its site or is used
        already (one ``DELETE`` decides: two reports racing with one nonce cannot both
        win)."""
        statement, rows = self._report_rows([report], now)
        t = self.t["nonces"]
        with self._tx("record a status report") as conn:
            used = conn.execute(
                sa.delete(t).where(t.c.site == report.site, t.c.nonce == report.nonce)
            )
            if used.rowcount != 1:
                return False
            conn.execute(statement, rows)
        return True

    def _report_rows(
        self, reports: Sequence[StatusReport], now: float
    ) -> tuple[Any, list[dict[str, Any]]]:
        t = self.t["sites"]
        rows = [
            {
                "b_site": r.site,
                "last_seen": now,
                "bundle": r.bundle,
                "release": r.release,
                "manifest_sha256": r.manifest_sha256,
                "phase": r.phase,
                "health": json.dumps(dict(r.health), sort_keys=True),
                "stale": r.stale,
                "error": r.error,
            }
            for r in reports
        ]
        keys = rows[0] if rows else {}
        statement = (
            sa.update(t)
            .where(t.c.site == sa.bindparam("b_site"))
            .values({k: sa.bindparam(k) for k in keys if k != "b_site"})
        )
        return statement, rows

    def set_desired(self, conn: Connection, desired: Mapping[str, str | None]) -> None:
        if not desired:
            return
        t = self.t["sites"]
        rows = [{"b_site": s, "desired": d} for s, d in desired.items()]
        stmt = (
            sa.update(t)
            .where(t.c.site == sa.bindparam("b_site"))
            .values(desired=sa.bindparam("desired"))
        )
        for chunk in _chunks(rows):
            conn.execute(stmt, list(chunk))

    # --------------------------------------------------------------------------- nonces

    def issue_nonce(self, site: str, nonce: str, now: float, *, keep: int = 8) -> None:
        """Store a nonce issued to ``site``; only its newest ``keep`` stay valid."""
        t = self.t["nonces"]
        with self._tx("issue a nonce") as conn:
            conn.execute(sa.insert(t), {"site": site, "nonce": nonce, "issued_at": now})
            old = (
                conn.execute(
                    sa.select(t.c.nonce)
                    .where(t.c.site == site)
                    .order_by(t.c.issued_at.desc(), t.c.nonce)
                    .offset(keep)
                )
                .scalars()
                .all()
            )
            if old:
                conn.execute(sa.delete(t).where(t.c.site == site, t.c.nonce.in_(old)))

    def consume_nonce(self, site: str, nonce: str) -> bool:
        """Use a nonce up; false when it was never issued to ``site`` or is used already.
        One statement: two reports racing with one nonce cannot both win."""
        t = self.t["nonces"]
        with self._tx("use a nonce") as conn:
            result = conn.execute(sa.delete(t).where(t.c.site == site, t.c.nonce == nonce))
            return bool(result.rowcount == 1)

    # ------------------------------------------------------------------------- rollouts

    def create_rollout(
        self,
        rollout: Rollout,
        *,
        desired: Mapping[str, str | None] | None = None,
        events: Sequence[tuple[str | None, str, Mapping[str, Any]]] = (),
        now: float,
    ) -> int:
        """Store a new rollout, every site's part in it, the desired bundles and events
        of its first step; its first version (0)."""
        with self._tx("create a rollout") as conn:
            conn.execute(
                sa.insert(self.t["rollouts"]),
                {
                    "id": rollout.id,
                    "fleet": rollout.fleet,
                    "bundle": rollout.bundle,
                    "state": rollout.state,
                    "header": json.dumps(rollout.header(), sort_keys=True),
                    "version": 0,
                    "started_at": rollout.started_at,
                    "updated_at": now,
                },
            )
            self._upsert(
                conn,
                self.t["rollout_sites"],
                [_progress_row(rollout.id, p) for p in rollout.sites.values()],
                ("rollout_id", "site"),
            )
            self.set_desired(conn, desired or {})
            self._add_events(conn, rollout.id, events, now)
        return 0

    def save_rollout(
        self,
        rollout: Rollout,
        version: int,
        changed: Iterable[SiteProgress],
        *,
        desired: Mapping[str, str | None] | None = None,
        events: Sequence[tuple[str | None, str, Mapping[str, Any]]] = (),
        now: float,
    ) -> int:
        """Save a rollout loaded at ``version``, the sites whose part changed, their new
        desired bundles and the events, in one transaction; the new version. When another
        writer saved it meanwhile: :class:`StaleRolloutError`, and nothing is written."""
        t = self.t["rollouts"]
        with self._tx("save a rollout") as conn:
            result = conn.execute(
                sa.update(t)
                .where(t.c.id == rollout.id, t.c.version == version)
                .values(
                    state=rollout.state,
                    header=json.dumps(rollout.header(), sort_keys=True),
                    version=version + 1,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                raise StaleRolloutError(
                    f"rollout {rollout.id} was changed by another command meanwhile; try again"
                )
            self._upsert(
                conn,
                self.t["rollout_sites"],
                [_progress_row(rollout.id, p) for p in changed],
                ("rollout_id", "site"),
            )
            self.set_desired(conn, desired or {})
            self._add_events(conn, rollout.id, events, now)
        return version + 1

    def rollout_version(self, rollout_id: str) -> int | None:
        """The version a rollout is saved at (``None``: no such rollout); one small read."""
        t = self.t["rollouts"]
        with self._tx("read a rollout's version") as conn:
            row = conn.execute(sa.select(t.c.version).where(t.c.id == rollout_id)).first()
        return None if row is None else int(row[0])

    def load_rollout(self, rollout_id: str) -> tuple[Rollout, int] | None:
        """A rollout and the version it was saved at."""
        t, ts = self.t["rollouts"], self.t["rollout_sites"]
        with self._errors("read a rollout"), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.c.header, t.c.version).where(t.c.id == rollout_id)
            ).first()
            if row is None:
                return None
            sites = [
                SiteProgress(
                    site=r.site,
                    wave=r.wave,
                    previous=r.previous,
                    state=r.state,
                    assigned_at=r.assigned_at,
                    active_since=r.active_since,
                    reason=r.reason,
                    excused=bool(r.excused),
                )
                for r in conn.execute(
                    sa.select(ts).where(ts.c.rollout_id == rollout_id).order_by(ts.c.site)
                )
            ]
        return Rollout.from_header(json.loads(row.header), sites), int(row.version)

    def rollouts(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """Every rollout (of ``fleet``), newest first: id, fleet, bundle, state, times."""
        t = self.t["rollouts"]
        stmt = sa.select(t.c.id, t.c.fleet, t.c.bundle, t.c.state, t.c.started_at, t.c.updated_at)
        if fleet is not None:
            stmt = stmt.where(t.c.fleet == fleet)
        stmt = stmt.order_by(t.c.started_at.desc(), t.c.id.desc())
        with self._errors("list rollouts"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # --------------------------------------------------------------------------- events

    def _add_events(
        self,
        conn: Connection,
        rollout_id: str | None,
        events: Sequence[tuple[str | None, str, Mapping[str, Any]]],
        now: float,
    ) -> None:
        rows = [
            {
                "at": now,
                "rollout_id": rollout_id,
                "site": site,
                "kind": kind,
                "detail": json.dumps(dict(detail), sort_keys=True),
            }
            for site, kind, detail in events
        ]
        for chunk in _chunks(rows):
            conn.execute(sa.insert(self.t["events"]), list(chunk))

    def add_events(
        self,
        rollout_id: str | None,
        events: Sequence[tuple[str | None, str, Mapping[str, Any]]],
        now: float,
    ) -> None:
        """Append ``(site, kind, detail)`` events."""
        with self._tx("log events") as conn:
            self._add_events(conn, rollout_id, events, now)

    def events(self, rollout_id: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of a rollout), oldest first."""
        t = self.t["events"]
        stmt = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if rollout_id is not None:
            stmt = stmt.where(t.c.rollout_id == rollout_id)
        with self._errors("read events"), self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows[::-1]


def _site(row: Any) -> SiteRecord:
    return SiteRecord(
        site=row.site,
        region=row.region,
        fleet=row.fleet,
        public_key=json.loads(row.public_key),
        registered_at=row.registered_at,
        last_seen=row.last_seen,
        bundle=row.bundle,
        release=row.release,
        manifest_sha256=row.manifest_sha256,
        desired=row.desired,
        phase=row.phase,
        health=json.loads(row.health or "{}"),
        stale=bool(row.stale),
        error=row.error,
    )


def _progress_row(rollout_id: str, p: SiteProgress) -> dict[str, Any]:
    return {"rollout_id": rollout_id, **p.to_dict()}
