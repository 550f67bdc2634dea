"""Migrations: up, down, up again on both databases, with the models and migrations in step."""

from sqlalchemy import inspect

from store import migrate
from store.db import Database


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade_round_trips_and_matches_the_models(db):
    from sqlmodel import SQLModel

    assert migrate.current_revision(db.engine) == migrate.head_revision()
    migrate.check(db.engine)  # raises if autogenerate would find a difference
    assert _tables(db) == set(SQLModel.metadata.tables)
    migrate.downgrade(db.engine, "base")
    assert _tables(db) == set()
    assert migrate.current_revision(db.engine) is None
    migrate.upgrade(db.engine)
    assert _tables(db) == set(SQLModel.metadata.tables)
    migrate.check(db.engine)
