"""Engines and transactions for the store: SQLite by default, PostgreSQL at scale.

SQLite follows RELIABILITY.md §5: WAL, a long busy_timeout, foreign keys on, and every write
transaction opened with `BEGIN IMMEDIATE`, so a writer takes the write lock up front instead of
failing to upgrade a read lock half-way (the "database is locked" class of bugs). Reads open a
plain deferred transaction, which in WAL mode never blocks and is never blocked by writers.

Nothing here is global: callers build a `Database` from a URL and pass it (or its sessions) on.

    db = Database.from_url("sqlite:///prefloop-data/prefloop.db")
    with db.write() as session:      # BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error)
        ...
    with db.read() as session:
        ...
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, create_engine

T = TypeVar("T")

SqliteSynchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# ms: long enough that a writer waiting behind another under load waits instead of failing
# (Argilla raised theirs from 5 s to 30 s for 20 parallel bulk writers, RELIABILITY.md §1).
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def normalise_url(url: str) -> str:
    """Accept `postgresql://` and pick the psycopg 3 driver, which is what we install."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(
    url: str, *, sqlite_synchronous: SqliteSynchronous = "FULL", echo: bool = False
) -> Engine:
    """Build an engine for `url` with the store's connection settings.

    `sqlite_synchronous="FULL"` makes an acknowledged label survive power loss; `NORMAL` only
    survives a process crash (sqlite.org/wal.html) and is faster.
    """
    url = normalise_url(url)
    if not is_sqlite(url):
        # Pool at least as large as the web server's thread pool (fastapi/fastapi#3205).
        return create_engine(
            url, echo=echo, pool_size=20, max_overflow=20, pool_pre_ping=True,
            pool_timeout=30,
        )

    database = make_url(url).database
    in_memory = database in (None, "", ":memory:")
    if not in_memory:
        Path(str(database)).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        # One shared connection for an in-memory database, or each thread sees its own empty one.
        **({"poolclass": StaticPool} if in_memory else {"pool_size": 20, "max_overflow": 20}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite, which would otherwise emit a deferred
        # BEGIN lazily before the first write; `_on_begin` below emits our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("prefloop_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _is_retryable(exc: BaseException) -> bool:
    """Transient contention: SQLite busy/locked, PostgreSQL serialization failure or deadlock."""
    if isinstance(exc, OperationalError) and "locked" in str(exc).lower():
        return True
    if isinstance(exc, DBAPIError):
        code = getattr(getattr(exc, "orig", None), "sqlstate", None)
        return code in ("40001", "40P01")
    return False


class Database:
    """An engine plus the two ways to use it: `read()` and `write()` sessions."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self.is_sqlite = engine.dialect.name == "sqlite"
        # Same pool, but connections checked out through it begin IMMEDIATE on SQLite.
        self._write_engine = engine.execution_options(prefloop_write=True)
        # SQLite has one writer. Between threads of this process, hand the write lock over with
        # a Python lock: SQLite's busy handler polls with growing sleeps, so a waiting writer
        # can sleep long after the lock is free (measured: p99 536 ms -> see BENCHMARKS.md).
        # Other processes on the same file still wait through busy_timeout.
        self._local_writer = threading.Lock() if self.is_sqlite else None

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> Database:
        return cls(make_engine(url, **kw))

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: committed when the block exits, rolled back if it raises."""
        if self._local_writer is None:
            with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                yield session
            return
        with self._local_writer, Session(self._write_engine, expire_on_commit=False) as session, \
                session.begin():
            yield session

    def run_write(self, fn: Callable[[Session], T], *, attempts: int = 5) -> T:
        """Run `fn(session)` in one write transaction, retrying on transient contention.

        `fn` must be safe to re-run from scratch (it is: the transaction was rolled back).
        """
        for attempt in range(attempts):
            try:
                with self.write() as session:
                    return fn(session)
            except DBAPIError as exc:
                if not _is_retryable(exc) or attempt == attempts - 1:
                    raise
                time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
