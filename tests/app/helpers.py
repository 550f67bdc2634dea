"""Builders for app tests: accounts with tokens, tasks, a live uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlmodel import select

from app.web_security import UVICORN_OPTIONS
from store import accounts, repo
from store.db import Database
from store.models import Label, Role, Task, TaskKind, TaskLease


def add_user(db: Database, name: str, role: str = "annotator") -> tuple[int, str]:
    """(annotator id, API token) of a new account."""
    annotator, token = db.run_write(lambda s: accounts.create_account(
        session=s, name=name, role=Role(role), token_ttl=timedelta(days=1)))
    assert annotator.id is not None
    return annotator.id, token


def add_task(db: Database, kind: TaskKind = TaskKind.pairwise, *, prompt: Any = "Q?",
             completions: list[Any] | None = None, overlap: int = 1,
             gold: dict[str, Any] | None = None, priority: int = 0) -> int:
    k = {TaskKind.pairwise: 2, TaskKind.binary: 1, TaskKind.listwise: 3}[kind]
    completions = completions or [f"answer {i} to {prompt!s:.40}" for i in range(k)]

    def write(session: Any) -> int:
        p = repo.get_or_create_prompt(session=session, content=prompt)
        assert p.id is not None
        ids = [repo.get_or_create_completion(session=session, prompt_id=p.id, content=c,
                                             origin="external:test").id for c in completions]
        task, _ = repo.get_or_create_task(session=session, kind=kind, prompt_id=p.id,
                                          completion_ids=[i for i in ids if i is not None],
                                          overlap=overlap, gold=gold,
                                          priority=priority)
        assert task.id is not None
        return task.id

    return db.run_write(write)


def labels_of(db: Database, task_id: int) -> list[Label]:
    with db.read() as session:
        return list(session.exec(select(Label).where(Label.task_id == task_id)
                                 .order_by(Label.id)).all())  # type: ignore[arg-type]


def lease(db: Database, task_id: int, annotator_id: int) -> TaskLease:
    with db.read() as session:
        row = session.exec(select(TaskLease).where(TaskLease.task_id == task_id,
                                                   TaskLease.annotator_id == annotator_id)
                           ).first()
        assert row is not None
        return row


def task(db: Database, task_id: int) -> Task:
    with db.read() as session:
        row = session.get(Task, task_id)
        assert row is not None
        return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free local port in a thread; yields the base URL."""
    port = free_port()
    # As `prefloop up` runs it: forwarded addresses are the app's business (web_security).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, **UVICORN_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
