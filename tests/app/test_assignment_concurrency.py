"""Assignment under concurrency, on SQLite and PostgreSQL: many annotators pulling and labelling
at once never exceed a task's overlap, never label a task twice, and leave nothing stranded
(the "hammer test": N tasks in, exactly N x overlap labels out, every run)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import select

from app import annotation
from app.schemas import LabelIn
from app.settings import Settings
from store.db import Database
from store.errors import StoreError
from store.models import Label, Role, TaskKind
from tests.app.helpers import add_task, add_user


def _users(db: Database, n: int) -> list[annotation.User]:
    users = []
    for i in range(n):
        annotator_id, _ = add_user(db, f"worker{i}")
        users.append(annotation.User(id=annotator_id, name=f"worker{i}", role=Role.annotator,
                                     token_id=0))
    return users


def _drain(db: Database, settings: Settings, users: list[annotation.User]
           ) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(users))

    def work(user: annotation.User) -> None:
        barrier.wait()
        try:
            while True:
                task = annotation.next_task(db, settings, user, TaskKind.pairwise)
                if task is None:
                    return
                annotation.submit_label(db, user, task.task_id, LabelIn(choice="a"),
                                        idempotency_key=uuid.uuid4().hex)
        except (StoreError, Exception) as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return errors


@pytest.mark.parametrize(("tasks", "annotators", "overlap"), [(60, 12, 1), (20, 5, 3)])
def test_hammer_exact_label_counts(db: Database, tmp_path: Path, tasks: int, annotators: int,
                                   overlap: int) -> None:
    settings = Settings(data_dir=tmp_path)
    task_ids = [add_task(db, prompt=f"q{i}", overlap=overlap) for i in range(tasks)]
    users = _users(db, annotators)
    assert _drain(db, settings, users) == []
    with db.read() as session:
        labels = session.exec(select(Label)).all()
    per_task = Counter(label.task_id for label in labels)
    assert per_task == {task_id: overlap for task_id in task_ids}
    assert len({(lab.task_id, lab.annotator_id) for lab in labels}) == tasks * overlap
