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


def test_migration_0004_turns_json_null_literals_into_sql_null(db):
    from sqlalchemy import text

    migrate.downgrade(db.engine, "0003")
    with db.engine.begin() as c:
        c.execute(text("INSERT INTO prompt (content, content_hash, dataset, split, created_at) "
                       "VALUES ('\"q\"', 'h', 'd', 'train', CURRENT_TIMESTAMP)"))
        c.execute(text("INSERT INTO task (task_key, kind, prompt_id, overlap, gold, priority, "
                       "created_at) VALUES ('k1', 'binary', 1, 1, 'null', 0, CURRENT_TIMESTAMP), "
                       "('k2', 'binary', 1, 1, '{\"choice\": \"up\"}', 0, CURRENT_TIMESTAMP)"))
    migrate.upgrade(db.engine)
    with db.engine.connect() as c:
        rows = c.execute(text("SELECT task_key, gold IS NULL FROM task ORDER BY task_key")).all()
    assert [(key, bool(is_null)) for key, is_null in rows] == [("k1", True), ("k2", False)]
