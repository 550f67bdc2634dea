"""What the annotator app does, independent of how it is asked: the REST routes and the Gradio
UI both call these functions, so both go through the same checks and the same store write path
(`store.repo.submit_label` for every label).

Each function takes the `Database`, the settings and the authenticated `User`, runs one read or
one write transaction, and returns API schemas (positions in the caller's shown order).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, TypeVar

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.schemas import (
    GoldIn,
    LabelIn,
    LabelOut,
    LabelsPage,
    PromptIn,
    PromptOut,
    ShownCompletion,
    TaskIn,
    TaskOut,
    TaskView,
)
from app.settings import Settings
from store import assignment, repo
from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound
from store.models import (
    Completion,
    Label,
    LeaseState,
    Prompt,
    Role,
    Task,
    TaskKind,
    TaskLease,
    utcnow,
)
from store.values import (
    pairwise_canonical_to_shown,
    pairwise_shown_to_canonical,
    ranking_to_ranks,
    ranks_canonical_to_shown,
    ranks_shown_to_canonical,
)

T = TypeVar("T")

# SQLite has one writer. Threads of this process queue for it on a lock rather than in SQLite's
# busy handler, which sleeps in growing steps (up to 100 ms) and so turns contention into tail
# latency. Other processes on the same file still wait in the busy handler, as before.
_WRITE_LOCKS: weakref.WeakKeyDictionary[Database, threading.Lock] = (
    weakref.WeakKeyDictionary())
_LOCKS_GUARD = threading.Lock()
# Queue upkeep (new tasks, expired leases) at most this often per store and process.
HOUSEKEEPING_EVERY_S = 1.0
_LAST_HOUSEKEEPING: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()


def write(db: Database, fn: Callable[[Session], T]) -> T:
    """`db.run_write(fn)`, one writer at a time within this process on SQLite."""
    if not db.is_sqlite:
        return db.run_write(fn)
    with _LOCKS_GUARD:
        lock = _WRITE_LOCKS.setdefault(db, threading.Lock())
    with lock:
        return db.run_write(fn)


def _housekeeping_due(db: Database) -> bool:
    now = time.monotonic()
    with _LOCKS_GUARD:
        if now - _LAST_HOUSEKEEPING.get(db, float("-inf")) < HOUSEKEEPING_EVERY_S:
            return False
        _LAST_HOUSEKEEPING[db] = now
        return True


@dataclass(frozen=True)
class User:
    """The authenticated caller (a human account) and the token that authenticated it."""

    id: int
    name: str
    role: Role
    token_id: int

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin


# ---------------------------------------------------------------------------------------------
# Converting between the caller's (shown) positions and the store's (canonical) ones


def to_canonical(kind: TaskKind, body: LabelIn | GoldIn, shown_order: list[int]
                 ) -> dict[str, Any]:
    """The store's label value for an API body, checking the body fits the task kind."""
    given = [name for name in ("choice", "ranking", "value") if getattr(body, name) is not None]
    expected = {TaskKind.pairwise: "choice", TaskKind.listwise: "ranking",
                TaskKind.binary: "value"}[kind]
    if given != [expected]:
        raise InvalidInput(f"a {kind.value} label is {{\"{expected}\": ...}}"
                           + (f", not {', '.join(given)}" if given else ""))
    if kind == TaskKind.pairwise:
        assert body.choice is not None
        return {"choice": pairwise_shown_to_canonical(body.choice, shown_order)}
    if kind == TaskKind.binary:
        return {"choice": body.value}
    shown_ranks = ranking_to_ranks(body.ranking, len(shown_order))
    return {"ranks": ranks_shown_to_canonical(shown_ranks, shown_order)}


def ranks_to_ranking(ranks: list[int]) -> list[int | list[int]]:
    """Dense ranks per index -> [best, ..., worst] with tie groups as lists."""
    out: list[int | list[int]] = []
    for rank in sorted(set(ranks)):
        group = [i for i, r in enumerate(ranks) if r == rank]
        out.append(group[0] if len(group) == 1 else group)
    return out


def label_out(label: Label, kind: TaskKind, replayed: bool = False) -> LabelOut:
    assert label.id is not None
    order = label.shown_order or list(range(len(label.ranks or [0, 0])))
    out = LabelOut(label_id=label.id, task_id=label.task_id, kind=kind.value,
                   rationale=label.rationale, created_at=label.created_at.replace(tzinfo=UTC)
                   if label.created_at.tzinfo is None else label.created_at, replayed=replayed)
    if kind == TaskKind.pairwise and label.choice is not None:
        out.choice = pairwise_canonical_to_shown(label.choice, order)
    elif kind == TaskKind.binary:
        out.value = label.choice
    elif label.ranks is not None:
        out.ranking = ranks_to_ranking(ranks_canonical_to_shown(label.ranks, order))
    return out


def _task_view(session: Session, task: Task, lease: TaskLease, resumed: bool) -> TaskView:
    assert task.id is not None
    prompt = session.get(Prompt, task.prompt_id)
    assert prompt is not None
    completion_ids = repo.task_completion_ids(session=session, task_id=task.id)
    contents = {c.id: c.content for c in session.exec(
        select(Completion).where(col(Completion.id).in_(completion_ids)))}
    shown = [ShownCompletion(index=i, content=contents[completion_ids[position]])
             for i, position in enumerate(lease.shown_order)]
    expires = lease.expires_at if lease.expires_at.tzinfo else lease.expires_at.replace(
        tzinfo=UTC)
    return TaskView(task_id=task.id, kind=task.kind.value, prompt=prompt.content,
                    completions=shown, lease_expires_at=expires, resumed=resumed)


# ---------------------------------------------------------------------------------------------
# Annotator actions


def next_task(db: Database, settings: Settings, user: User, kind: TaskKind) -> TaskView | None:
    """Lease the next task of `kind` to the user (or return the one they already hold)."""

    def claim(session: Session) -> tuple[Task, TaskLease, bool] | None:
        offer = assignment.next_task(
            session=session, annotator_id=user.id, kind=kind,
            ttl=timedelta(seconds=settings.lease_ttl_s), gold_rate=settings.gold_rate,
            housekeeping=housekeeping)
        return None if offer is None else (offer.task, offer.lease, offer.resumed)

    housekeeping = _housekeeping_due(db)
    claimed = write(db, claim)
    if claimed is None:
        return None
    # The texts are read after the write transaction, so the single writer is held shorter.
    with db.read() as session:
        return _task_view(session, *claimed)


def submit_label(db: Database, user: User, task_id: int, body: LabelIn, *,
                 idempotency_key: str, request_id: str | None = None) -> LabelOut:
    """Store the user's label for a task they were given; replays and conflicts per the store."""

    def write_fn(session: Session) -> LabelOut:
        lease = assignment.lease_of(session=session, task_id=task_id, annotator_id=user.id)
        task = session.get(Task, task_id)
        assert task is not None  # the lease's foreign key
        value = to_canonical(task.kind, body, lease.shown_order)
        if lease.state != LeaseState.submitted:
            assignment.check_can_submit(session=session, lease=lease)
        result = repo.submit_label(
            session=session, task_id=task_id, annotator_id=user.id, value=value,
            shown_order=lease.shown_order, rationale=body.rationale,
            idempotency_key=idempotency_key, request_id=request_id)
        if not result.replayed:
            assignment.mark_submitted(session=session, lease=lease)
        return label_out(result.label, task.kind, result.replayed)

    return write(db, write_fn)


def skip_task(db: Database, user: User, task_id: int) -> None:
    write(db, lambda session: assignment.skip(session=session, task_id=task_id,
                                              annotator_id=user.id))


def undo_label(db: Database, settings: Settings, user: User, label_id: int, *,
               request_id: str | None = None) -> int:
    """Delete the user's own label within the grace period; they hold the task again."""

    def write_fn(session: Session) -> int:
        label = session.get(Label, label_id)
        if label is None or label.annotator_id != user.id:
            raise NotFound(f"label {label_id} does not exist")
        created = label.created_at if label.created_at.tzinfo else label.created_at.replace(
            tzinfo=UTC)
        if utcnow() - created > timedelta(seconds=settings.undo_grace_s):
            raise Conflict(f"label {label_id} can no longer be undone (grace period of "
                           f"{settings.undo_grace_s:g} s is over)")
        task_id = label.task_id
        repo.delete_label(session=session, label_id=label_id, actor_id=user.id,
                          request_id=request_id)
        assignment.reopen(session=session, task_id=task_id, annotator_id=user.id,
                          ttl=timedelta(seconds=settings.lease_ttl_s))
        return task_id

    return write(db, write_fn)


def my_labels(db: Database, user: User, *, limit: int, offset: int) -> LabelsPage:
    with db.read() as session:
        total = session.exec(select(func.count()).select_from(Label).where(
            Label.annotator_id == user.id)).one()
        rows = session.exec(
            select(Label, Task.kind).join(Task, col(Task.id) == col(Label.task_id))
            .where(Label.annotator_id == user.id)
            .order_by(col(Label.id).desc()).offset(offset).limit(limit)
        ).all()
        return LabelsPage(labels=[label_out(label, TaskKind(kind)) for label, kind in rows],
                          total=int(total))


def last_label(db: Database, user: User) -> LabelOut | None:
    page = my_labels(db, user, limit=1, offset=0)
    return page.labels[0] if page.labels else None


def progress(db: Database, user: User, kind: TaskKind) -> tuple[int, int]:
    """(labels the user has given, tasks of `kind` still available to them)."""
    with db.read() as session:
        done = session.exec(select(func.count()).select_from(Label).where(
            Label.annotator_id == user.id)).one()
        left = assignment.remaining(session=session, annotator_id=user.id, kind=kind)
    return int(done), left


# ---------------------------------------------------------------------------------------------
# Admin actions


def create_prompt(db: Database, body: PromptIn) -> PromptOut:
    content = body.content if isinstance(body.content, str) else [
        m.model_dump() for m in body.content]

    def write_fn(session: Session) -> PromptOut:
        prompt = repo.get_or_create_prompt(session=session, content=content,
                                           dataset=body.dataset, split=body.split,
                                           reference=body.reference)
        assert prompt.id is not None
        return PromptOut(prompt_id=prompt.id, dataset=prompt.dataset, split=prompt.split)

    return write(db, write_fn)


def create_task(db: Database, settings: Settings, body: TaskIn) -> TaskOut:
    kind = TaskKind(body.kind)

    def write_fn(session: Session) -> TaskOut:
        if session.get(Prompt, body.prompt_id) is None:
            raise NotFound(f"prompt {body.prompt_id} does not exist")
        ids = []
        for content in body.completions:
            value = content if isinstance(content, str) else [m.model_dump() for m in content]
            completion = repo.get_or_create_completion(
                session=session, prompt_id=body.prompt_id, content=value, origin=body.origin)
            assert completion.id is not None
            ids.append(completion.id)
        gold = None
        if body.gold is not None:
            gold = to_canonical(kind, body.gold, list(range(len(ids))))
        task, created = repo.get_or_create_task(
            session=session, kind=kind, prompt_id=body.prompt_id, completion_ids=ids,
            overlap=body.overlap or settings.overlap, gold=gold, priority=body.priority,
            source=body.source)
        assert task.id is not None
        return TaskOut(task_id=task.id, kind=task.kind.value, created=created,
                       completion_ids=repo.task_completion_ids(session=session,
                                                               task_id=task.id),
                       overlap=task.overlap, gold=task.gold is not None)

    return write(db, write_fn)
