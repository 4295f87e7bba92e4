"""The result store: every cloud answer, keyed by (site, message id), through SQLAlchemy.

SQLite (in WAL mode, so the HTTP API reads while the worker writes) by default,
PostgreSQL by URL (``postgresql+psycopg://…``). Writes come in batches and are
idempotent: a result already stored under its key is left as it is, because delivery is
at-least-once and the same item may be answered twice.

An SQLite file is checked when the store opens (``PRAGMA quick_check``: every page and
index entry, in time proportional to the file's size): a damaged file is refused with
:class:`StoreCorruptError`, naming the file and what to do, rather than served until a
write or a read lands on the damaged page.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from fogline.cloud_service.errors import ConfigError, StoreCorruptError, StoreError

__all__ = ["DEFAULT_TABLE", "ResultStore", "StoredResult", "normalize_message_id"]

log = logging.getLogger("fogline.cloud")

DEFAULT_TABLE = "fogline_results"
# What quick_check reports is one row per problem; a damaged file can have thousands.
_CHECK_ROWS = 5


def normalize_message_id(message_id: str | bytes) -> str:
    """A message id as 32 lowercase hex digits; accepts 16 raw bytes, hex or a UUID string."""
    try:
        if isinstance(message_id, bytes):
            return uuid.UUID(bytes=message_id).hex
        return uuid.UUID(message_id).hex
    except ValueError:
        raise ValueError(f"message id {message_id!r} is not a UUID") from None


@dataclass(frozen=True)
class StoredResult:
    """One cloud answer as the store keeps it. Times are µs since the epoch."""

    site: str
    message_id: str  # 32 hex digits
    bundle: str
    label: int
    confidence: float
    output: tuple[float, ...]
    worker: str
    created_us: int  # when the input reached the edge agent
    received_us: int  # when the worker received the features
    completed_us: int  # when the worker had the answer

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "message_id": self.message_id,
            "bundle": self.bundle,
            "label": self.label,
            "confidence": self.confidence,
            "output": list(self.output),
            "worker": self.worker,
            "created_us": self.created_us,
            "received_us": self.received_us,
            "completed_us": self.completed_us,
        }


def _table(name: str, metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("site", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.String(32), primary_key=True),
        sa.Column("bundle", sa.String(255), nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("output", sa.Text, nullable=False),  # JSON list
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("received_us", sa.BigInteger, nullable=False),
        sa.Column("completed_us", sa.BigInteger, nullable=False),
    )


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


class ResultStore:
    """Results in a relational database. Thread-safe: share one per process."""

    def __init__(self, url: str, *, table_name: str = DEFAULT_TABLE, create: bool = True) -> None:
        try:
            sa_url = sa.make_url(url)
        except (SQLAlchemyError, ValueError) as exc:
            raise ConfigError(f"store URL is invalid: {exc}") from exc
        kwargs: dict[str, Any] = {}
        if sa_url.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False}
            if sa_url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        else:
            kwargs["pool_pre_ping"] = True  # survive a database server restart
        try:
            self.engine: Engine = sa.create_engine(sa_url, **kwargs)
        except (SQLAlchemyError, ImportError) as exc:
            # The PostgreSQL driver is an extra of its own: say which one brings it.
            hint = (
                " (pip install 'fogline[postgres]')"
                if isinstance(exc, ImportError) and exc.name == "psycopg"
                else ""
            )
            raise ConfigError(
                f"cannot use store URL {sa_url.render_as_string()}: {exc}{hint}"
            ) from exc
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _enable_sqlite_wal)
            self._check_sqlite(sa_url.database)
        self.table = _table(table_name, sa.MetaData())
        self._key = (self.table.c.site, self.table.c.message_id)
        if create:
            self._create_table()

    def _check_sqlite(self, database: str | None) -> None:
        """Refuse a damaged SQLite file (see the module docstring)."""
        if database in (None, "", ":memory:"):
            return
        where = str(database)
        advice = (
            f"stop every worker using it, then restore {where} from a backup, or move it "
            f"aside (with its -wal and -shm files) to start with an empty store: the results "
            f"in it are then no longer served"
        )
        t0 = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql(f"PRAGMA quick_check({_CHECK_ROWS})").all()
        except SQLAlchemyError as exc:
            # "file is not a database", "database disk image is malformed": the header or
            # the schema itself is unreadable.
            text = str(getattr(exc, "orig", None) or exc)
            if "malformed" in text or "not a database" in text:
                self.engine.dispose()
                raise StoreCorruptError(
                    f"the result store {where} is damaged ({text}): {advice}"
                ) from exc
            self.engine.dispose()
            raise StoreError(f"cannot open the result store {where}: {text}") from exc
        # One line for the error: SQLite puts several problems in one row, on lines of their
        # own, after a "*** in database main ***" heading.
        problems = [
            line.strip()
            for row in rows
            for line in str(row[0]).splitlines()
            if line.strip() and not line.startswith("***")
        ]
        if problems != ["ok"]:
            self.engine.dispose()
            raise StoreCorruptError(
                f"the result store {where} is damaged (PRAGMA quick_check: "
                f"{'; '.join(problems[:_CHECK_ROWS])}): {advice}"
            )
        log.info(
            "result store %s passed its integrity check (quick_check) in %.2f s",
            where,
            time.perf_counter() - t0,
        )

    def _create_table(self) -> None:
        try:
            self.table.create(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            # Workers started together race here: the check and the CREATE are two
            # statements, and another process may create the table in between.
            try:
                exists = sa.inspect(self.engine).has_table(self.table.name)
            except SQLAlchemyError:
                exists = False
            if not exists:
                raise StoreError(f"cannot create the results table in {self.url}: {exc}") from exc

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot {doing} in {self.url}: {exc}") from exc

    def put_many(self, results: Sequence[StoredResult]) -> None:
        """Store results in one transaction; keys already present are left untouched."""
        if not results:
            return
        # A fixed key order keeps concurrent writers from deadlocking on PostgreSQL.
        rows = [_row(r) for r in sorted(results, key=lambda r: (r.site, r.message_id))]
        dialect = self.engine.dialect.name
        with self._errors("store results"):
            if dialect in ("sqlite", "postgresql"):
                mod = sqlite if dialect == "sqlite" else postgresql
                stmt = mod.insert(self.table).on_conflict_do_nothing(index_elements=self._key)
                with self.engine.begin() as conn:
                    conn.execute(stmt, rows)
            elif dialect in ("mysql", "mariadb"):
                with self.engine.begin() as conn:
                    conn.execute(self.table.insert().prefix_with("IGNORE"), rows)
            else:
                self._put_one_by_one(rows)

    def _put_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(self.table.insert(), row)
            except IntegrityError:
                continue

    def get(self, site: str, message_id: str | bytes) -> StoredResult | None:
        """The result for one item, or None. Raises ValueError for a malformed id."""
        mid = normalize_message_id(message_id)
        t = self.table
        with self._errors("read a result"), self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t).where(t.c.site == site, t.c.message_id == mid)
            ).one_or_none()
        if row is None:
            return None
        return _from_row(row._mapping)

    def get_many(
        self, keys: Sequence[tuple[str, str | bytes]]
    ) -> dict[tuple[str, str], StoredResult]:
        """The stored results among ``(site, message_id)`` keys, by ``(site, hex id)``; one
        query. Used to answer re-sent items without running them again."""
        if not keys:
            return {}
        wanted = {(site, normalize_message_id(mid)) for site, mid in keys}
        t = self.table
        cond = sa.tuple_(t.c.site, t.c.message_id).in_(sorted(wanted))
        with self._errors("read results"), self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(cond)).all()
        out: dict[tuple[str, str], StoredResult] = {}
        for row in rows:
            r = _from_row(row._mapping)
            out[(r.site, r.message_id)] = r
        return out

    def count(self) -> int:
        with self._errors("count results"), self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
            )

    def close(self) -> None:
        self.engine.dispose()


def _from_row(m: Any) -> StoredResult:
    return StoredResult(
        site=m["site"],
        message_id=m["message_id"],
        bundle=m["bundle"],
        label=int(m["label"]),
        confidence=float(m["confidence"]),
        output=tuple(float(x) for x in json.loads(m["output"])),
        worker=m["worker"],
        created_us=int(m["created_us"]),
        received_us=int(m["received_us"]),
        completed_us=int(m["completed_us"]),
    )


def _row(r: StoredResult) -> dict[str, Any]:
    return {
        "site": r.site,
        "message_id": r.message_id,
        "bundle": r.bundle,
        "label": r.label,
        "confidence": r.confidence,
        "output": json.dumps([round(float(x), 6) for x in r.output]),
        "worker": r.worker,
        "created_us": r.created_us,
        "received_us": r.received_us,
        "completed_us": r.completed_us,
    }
