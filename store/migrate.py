"""Schema migrations as functions: upgrade, downgrade, current revision, drift check.

    prefloop db upgrade            # to the newest schema
    prefloop db downgrade -1
    prefloop db current
    prefloop db check              # fails if the models and the migrations disagree
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _config(connection: Any) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _run(engine: Engine, fn: Any, *args: Any) -> Any:
    # On SQLite the connection must not be in our BEGIN IMMEDIATE mode (alembic manages it).
    with engine.begin() as connection:
        return fn(_config(connection), *args)


def upgrade(engine: Engine, revision: str = "head") -> None:
    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str) -> None:
    _run(engine, command.downgrade, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def check(engine: Engine) -> None:
    """Raise if the database (at head) and the SQLModel tables differ."""
    _run(engine, command.check)


def revision(engine: Engine, message: str) -> None:
    """Developer helper: autogenerate a new revision against `engine` (at head)."""
    _run(engine, lambda cfg, msg: command.revision(cfg, message=msg, autogenerate=True), message)
