"""The annotation domain: users, tasks and labels, independent of how they are asked for.

The REST routes (app/routes/api.py) and the Gradio labeling UI (labeling/ui.py) both call these
functions, so both go through the same checks and the same store write path
(`store.repo.submit_label` for every label).

Each function takes the `Database`, the settings and the authenticated `User`, runs one read or
one write transaction, and returns API schemas (positions in the caller's shown order).

    python -m pytest -q tests/app/test_api.py tests/app/test_assignment_concurrency.py
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
from sqlalchemy.engine import Connection
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
    Label,
    LeaseState,
    Prompt,
    Role,
    Task,
    TaskKind,
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

# Queue upkeep (new tasks, expired leases) at most this often per store and process.
HOUSEKEEPING_EVERY_S = 1.0
_LAST_HOUSEKEEPING: weakref.WeakKeyDictionary[Database, float] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def write(db: Database, fn: Callable[[Session], T]) -> T:
    """`db.run_write(fn)`: one write transaction, retried on transient contention (on SQLite,
    threads of this process take turns for the one writer inside `Database.write`)."""
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


def label_out(label: Label | repo.StoredLabel, kind: TaskKind, replayed: bool = False
              ) -> LabelOut:
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


def _task_view(connection: Connection, claim: assignment.Claim) -> TaskView:
    contents = assignment.task_contents(connection=connection, task_id=claim.task_id)
    assert contents is not None  # the lease's foreign key
    prompt, completions = contents
    shown = [ShownCompletion(index=i, content=completions[position])
             for i, position in enumerate(claim.shown_order)]
    return TaskView(task_id=claim.task_id, kind=claim.kind.value, prompt=prompt,
                    completions=shown, lease_expires_at=claim.expires_at,
                    resumed=claim.resumed)


# ---------------------------------------------------------------------------------------------
# Annotator actions


def next_task(db: Database, settings: Settings, user: User, kind: TaskKind) -> TaskView | None:
    """Lease the next task of `kind` to the user (or return the one they already hold)."""
    housekeeping = _housekeeping_due(db)

    def claim(session: Session) -> tuple[assignment.Claim, TaskView | None] | None:
        found = assignment.claim_next(
            session=session, annotator_id=user.id, kind=kind,
            ttl=timedelta(seconds=settings.lease_ttl_s), gold_rate=settings.gold_rate,
            housekeeping=housekeeping)
        if found is None:
            return None
        # PostgreSQL: read the texts in the same transaction (one round trip, no second
        # connection). SQLite: read them after it, so the single writer is held shorter.
        return found, None if db.is_sqlite else _task_view(session.connection(), found)

    claimed = write(db, claim)
    if claimed is None:
        return None
    found, view = claimed
    if view is not None:
        return view
    with db.engine.connect() as connection:
        return _task_view(connection, found)


def submit_label(db: Database, user: User, task_id: int, body: LabelIn, *,
                 idempotency_key: str, request_id: str | None = None) -> LabelOut:
    """Store the user's label for a task they were given; replays and conflicts per the store."""

    def write_fn(session: Session) -> LabelOut:
        lease = assignment.lease_for_submit(session=session, task_id=task_id,
                                            annotator_id=user.id)
        value = to_canonical(lease.kind, body, lease.shown_order)
        if lease.state != LeaseState.submitted:
            assignment.check_submit_lease(session=session, lease=lease)
        stored = repo.record_label(
            session=session, task_id=task_id, annotator_id=user.id, value=value,
            shown_order=lease.shown_order, rationale=body.rationale,
            idempotency_key=idempotency_key, request_id=request_id,
            shape=repo.TaskShape(lease.kind, lease.k))
        if not stored.replayed:
            assignment.mark_lease_submitted(session=session, lease_id=lease.lease_id)
        return label_out(stored, lease.kind, stored.replayed)

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
