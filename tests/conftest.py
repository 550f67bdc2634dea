"""Shared fixtures: a migrated store on SQLite (a temporary file) and on PostgreSQL.

PostgreSQL: the server at $PREFLOOP_TEST_PG_URL (default: the local one, database `test`). Each
test process creates its own database once, migrates it, and truncates it before every test.
Without a server the PostgreSQL cases are skipped, unless PREFLOOP_REQUIRE_POSTGRES=1 (set by CI),
which turns the skip into a failure so CI can never silently test SQLite only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from store import migrate
from store.db import Database, make_engine, normalise_url

PG_ADMIN_URL = os.environ.get("PREFLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
def _all_tables() -> str:
    from sqlmodel import SQLModel

    import store.models  # noqa: F401  (registers the tables)

    return ", ".join(SQLModel.metadata.tables)


def _pg_available() -> bool:
    try:
        engine = create_engine(normalise_url(PG_ADMIN_URL), connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test process, dropped at the end."""
    if not _pg_available():
        if os.environ.get("PREFLOOP_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (PREFLOOP_REQUIRE_POSTGRES=1) but "
                        f"{PG_ADMIN_URL} does not answer")
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL}")
    name = f"prefloop_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(PG_ADMIN_URL)).set(database=name).render_as_string(
        hide_password=False)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _fresh_db(request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Database]:
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("store") / "prefloop.db"
        db = Database.from_url(f"sqlite:///{path}")
        migrate.upgrade(db.engine)
    else:
        url = request.getfixturevalue("pg_database_url")
        db = Database.from_url(url)
        with db.engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {_all_tables()} RESTART IDENTITY CASCADE"))
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[Database]:
    """A migrated, empty store; every test using it runs on SQLite and on PostgreSQL."""
    yield from _fresh_db(request, request.param, tmp_path_factory)


@pytest.fixture
def sqlite_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Database]:
    yield from _fresh_db(request, "sqlite", tmp_path_factory)
