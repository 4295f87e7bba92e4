"""Every SQLAlchemy error becomes the package's own :class:`StoreError` at the store's one
mapping point (``ResultStore._errors``): the exception classes are walked from
``SQLAlchemyError`` down, so a class a new SQLAlchemy adds is checked too."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import sqlalchemy.exc as sa_exc

from fogline.cloud_service import CloudServiceError, ResultStore, StoreError

# Import the modules that define more SQLAlchemyError subclasses, so the walk sees them.
for _name in ("sqlalchemy.orm.exc", "sqlalchemy.ext.asyncio.exc"):
    importlib.import_module(_name)


def _subclasses(root: type[BaseException]) -> list[type[BaseException]]:
    seen: dict[type[BaseException], None] = {}
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen[cls] = None
        todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}")


SQLALCHEMY_ERRORS = _subclasses(sa_exc.SQLAlchemyError)


def _instance(cls: type[BaseException]) -> BaseException:
    """One instance of ``cls``, whatever its constructor takes."""
    orig = RuntimeError("driver said no")
    attempts: list[tuple[object, ...]] = [
        ("SELECT 1", {}, orig),  # DBAPIError and its family
        ("message", "SELECT 1", {}, orig),  # StatementError
        ("message",),
        (),
    ]
    # Otherwise a string for each required parameter (e.g. NoReferencedTableError's
    # message and table name).
    params = inspect.signature(cls).parameters.values()
    required = [p for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    attempts.append(tuple(f"{p.name} value" for p in required))
    for args in attempts:
        try:
            exc = cls(*args)
            str(exc)  # the mapping puts the message into StoreError's
        except Exception:  # a constructor of another form: try the next
            continue
        return exc
    # ORM errors take ORM objects (an instance state, a mapper property): the mapping
    # depends on the class alone, so build one without its constructor.
    exc = cls.__new__(cls)
    sa_exc.SQLAlchemyError.__init__(exc, f"a {cls.__name__} built by the test")  # type: ignore[arg-type]
    str(exc)
    return exc


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(f"sqlite:///{tmp_path / 'results.db'}")


def test_the_walk_finds_sqlalchemys_error_classes() -> None:
    names = {c.__name__ for c in SQLALCHEMY_ERRORS}
    assert {"OperationalError", "IntegrityError", "TimeoutError", "NoResultFound"} <= names
    assert len(SQLALCHEMY_ERRORS) > 40


@pytest.mark.parametrize("cls", SQLALCHEMY_ERRORS, ids=lambda c: c.__qualname__)
def test_each_sqlalchemy_error_becomes_a_store_error(
    store: ResultStore, cls: type[BaseException]
) -> None:
    raised = _instance(cls)
    with pytest.raises(StoreError) as caught, store._errors("do the test's work"):
        raise raised
    assert caught.value.__cause__ is raised
    assert isinstance(caught.value, CloudServiceError)
    assert "cannot do the test's work in sqlite:///" in str(caught.value)


def test_errors_that_are_not_sqlalchemys_pass_through(store: ResultStore) -> None:
    with pytest.raises(KeyError), store._errors("do the test's work"):
        raise KeyError("a bug, not the database")


def test_a_real_database_failure_reaches_the_caller_as_a_store_error(tmp_path: Path) -> None:
    store = ResultStore(f"sqlite:///{tmp_path / 'results.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {store.table.name}")
    with pytest.raises(StoreError, match="cannot read a result"):
        store.get("site-a", "00" * 16)
    store.close()
