"""Task assignment: who labels what next, under a lease, with overlap and gold tasks.

A lease is one `TaskLease` row per (task, annotator), ever: it records the order the completions
were shown in, and its state (active -> submitted | skipped | expired). Rules:

- a task takes `overlap` distinct human labels; while a lease is active it holds one of those
  slots, so with overlap 1 a task is leased to one annotator at a time; an expired lease frees
  its slot and the task is offered again;
- an annotator never gets a task they have labelled, skipped or hold a live lease on, and a task
  they let expire is offered to others first (it can come back to them once nobody else wants it);
- gold tasks (a known answer in `Task.gold`) do not count against overlap: every annotator may
  get each one, mixed in at `gold_rate`.

Claiming runs inside the caller's write transaction: on SQLite that is `BEGIN IMMEDIATE`, so
claims are serialised; on PostgreSQL candidate rows are taken `FOR UPDATE SKIP LOCKED` and the
slot count is checked again once the row is locked. Candidates come from `task_queue`, which
marks tasks whose slots are all taken, so a pick scans open tasks only (in index order: highest
priority, then oldest) however many tasks are already done.

    with db.write() as session:
        offer = next_task(session=session, annotator_id=7, kind=TaskKind.pairwise,
                          ttl=timedelta(minutes=10))
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, false, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from store.errors import Conflict, InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    Label,
    LeaseState,
    Task,
    TaskItem,
    TaskKind,
    TaskLease,
    TaskQueueEntry,
    utcnow,
)

# Safety bound on how many locked candidates are re-checked before giving up (PostgreSQL only:
# a candidate can lose its last slot between the snapshot and the row lock).
MAX_CLAIM_ATTEMPTS = 20


@dataclass(frozen=True)
class Offer:
    task: Task
    lease: TaskLease
    # True when the annotator already held this lease (a reload), False for a fresh claim.
    resumed: bool


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def is_gold_clause() -> Any:
    return col(Task.gold).is_not(None)


def has_gold(task: Task) -> bool:
    return task.gold is not None


def _human_labels(task_id_expr: Any) -> Any:
    return (
        select(func.count())
        .select_from(Label)
        .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
        .where(col(Label.task_id) == task_id_expr, Annotator.kind == AnnotatorKind.human)
        .scalar_subquery()
    )


def _live_leases(task_id_expr: Any, annotator_id: int, now: datetime) -> Any:
    """Active, unexpired leases of *other* annotators on the task."""
    return (
        select(func.count())
        .select_from(TaskLease)
        .where(col(TaskLease.task_id) == task_id_expr, TaskLease.state == LeaseState.active,
               col(TaskLease.expires_at) > now, TaskLease.annotator_id != annotator_id)
        .scalar_subquery()
    )


def expire_leases(*, session: Session, now: datetime | None = None) -> int:
    """Mark active leases past their expiry as expired (their slots are free again)."""
    now = now or utcnow()
    task_ids = list(session.execute(
        update(TaskLease)
        .where(col(TaskLease.state) == LeaseState.active, col(TaskLease.expires_at) <= now)
        .values(state=LeaseState.expired)
        .returning(col(TaskLease.task_id))
    ).scalars())
    _set_full(session, task_ids, False)
    return len(task_ids)


def _set_full(session: Session, task_ids: list[int], full: bool) -> None:
    if task_ids:
        session.execute(update(TaskQueueEntry)
                        .where(col(TaskQueueEntry.task_id).in_(sorted(set(task_ids))))
                        .values(full=full))


# Tasks created within this many ids below the newest queued one are checked for a missing
# queue row on every pick (PostgreSQL may commit ids out of order); older ones at sync_queue.
SYNC_WINDOW = 1000


def sync_queue(*, session: Session, full: bool = False) -> int:
    """Add queue rows for tasks that have none (all tasks when `full`, else the recent ones);
    with `full`, also recompute every row's priority and fullness. Returns rows added."""
    newest = session.exec(select(func.max(TaskQueueEntry.task_id))).one() or 0
    source = sa_select(col(Task.id), col(Task.kind), is_gold_clause(), -col(Task.priority),
                       false()).where(~exists().where(col(TaskQueueEntry.task_id) == Task.id))
    if not full:
        source = source.where(col(Task.id) > newest - SYNC_WINDOW)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    insert = dialect.insert(TaskQueueEntry).from_select(
        ["task_id", "kind", "gold", "minus_priority", "full"], source
    ).on_conflict_do_nothing()
    added = int(session.execute(insert).rowcount or 0)  # type: ignore[attr-defined]
    if full:
        now = utcnow()
        used = _human_labels(TaskQueueEntry.task_id) + _live_leases(
            TaskQueueEntry.task_id, -1, now)
        session.execute(update(TaskQueueEntry).values(
            minus_priority=-select(Task.priority).where(
                Task.id == TaskQueueEntry.task_id).scalar_subquery(),
            gold=select(is_gold_clause()).where(
                Task.id == TaskQueueEntry.task_id).scalar_subquery(),
        ))
        session.execute(update(TaskQueueEntry).values(
            full=and_(~col(TaskQueueEntry.gold), used >= select(Task.overlap).where(
                Task.id == TaskQueueEntry.task_id).scalar_subquery())))
    return added


def _current_lease(session: Session, annotator_id: int, kind: TaskKind,
                   now: datetime) -> tuple[Task, TaskLease] | None:
    row = session.exec(
        select(Task, TaskLease)
        .join(TaskLease, col(TaskLease.task_id) == col(Task.id))
        .where(TaskLease.annotator_id == annotator_id, TaskLease.state == LeaseState.active,
               col(TaskLease.expires_at) > now, Task.kind == kind)
        .order_by(col(TaskLease.leased_at))
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else None


def _candidates(session: Session, *, annotator_id: int, kind: TaskKind, gold: bool,
                exclude: list[int], own_expired: bool) -> Task | None:
    mine = exists().where(
        col(TaskLease.task_id) == TaskQueueEntry.task_id,
        col(TaskLease.annotator_id) == annotator_id,
        col(TaskLease.state) != LeaseState.expired,
    )
    my_expired = exists().where(
        col(TaskLease.task_id) == TaskQueueEntry.task_id,
        col(TaskLease.annotator_id) == annotator_id,
        col(TaskLease.state) == LeaseState.expired,
    )
    labelled = exists().where(col(Label.task_id) == TaskQueueEntry.task_id,
                              col(Label.annotator_id) == annotator_id)
    query = sa_select(col(TaskQueueEntry.task_id)).where(
        col(TaskQueueEntry.kind) == kind, col(TaskQueueEntry.gold) == gold,
        col(TaskQueueEntry.full) == false(),
        ~mine, ~labelled, my_expired if own_expired else ~my_expired,
    )
    if exclude:
        query = query.where(col(TaskQueueEntry.task_id).not_in(exclude))
    query = query.order_by(col(TaskQueueEntry.minus_priority), col(TaskQueueEntry.task_id))
    query = query.limit(1)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    task_id = session.execute(query).scalar()
    return session.get(Task, task_id) if task_id is not None else None


def used_slots(*, session: Session, task: Task, annotator_id: int,
               now: datetime | None = None) -> int:
    """Human labels plus live leases of annotators other than `annotator_id` on the task."""
    now = now or utcnow()
    return int(session.exec(
        select(_human_labels(task.id) + _live_leases(task.id, annotator_id, now))
    ).one())


def has_free_slot(*, session: Session, task: Task, annotator_id: int,
                  now: datetime | None = None) -> bool:
    """Whether `annotator_id` may still label `task` without exceeding its overlap."""
    if has_gold(task):
        return True
    return used_slots(session=session, task=task, annotator_id=annotator_id,
                      now=now) < task.overlap


def _claim(session: Session, *, annotator_id: int, kind: TaskKind, gold: bool, now: datetime,
           ttl: timedelta, rng: random.Random) -> Offer | None:
    passes = [False]
    if session.exec(select(TaskLease.id).where(
            TaskLease.annotator_id == annotator_id,
            TaskLease.state == LeaseState.expired).limit(1)).first() is not None:
        passes.append(True)
    for own_expired in passes:
        exclude: list[int] = []
        for _ in range(MAX_CLAIM_ATTEMPTS):
            task = _candidates(session, annotator_id=annotator_id, kind=kind, gold=gold,
                               exclude=exclude, own_expired=own_expired)
            if task is None:
                break
            assert task.id is not None
            # Re-count now that the row is locked (a new statement sees the latest commits).
            # Candidates carry no live lease of this annotator, so this counts every slot.
            used = 0 if gold else used_slots(session=session, task=task,
                                             annotator_id=annotator_id, now=now)
            if used >= task.overlap:
                exclude.append(task.id)
                _set_full(session, [task.id], True)  # the hint was stale: correct it
                continue
            lease = _lease(session, task, annotator_id, now, ttl, rng)
            if not gold and used + 1 >= task.overlap:
                _set_full(session, [task.id], True)
            return Offer(task, lease, False)
    return None


def _lease(session: Session, task: Task, annotator_id: int, now: datetime, ttl: timedelta,
           rng: random.Random) -> TaskLease:
    assert task.id is not None
    lease = session.exec(select(TaskLease).where(
        TaskLease.task_id == task.id, TaskLease.annotator_id == annotator_id)).first()
    if lease is not None:  # one of the annotator's own expired leases, taken up again
        lease.state, lease.leased_at, lease.expires_at = LeaseState.active, now, now + ttl
        session.add(lease)
        session.flush()
        return lease
    k = {TaskKind.pairwise: 2, TaskKind.binary: 1}.get(task.kind) or session.exec(
        select(func.count()).select_from(TaskItem).where(TaskItem.task_id == task.id)
    ).one()
    order = list(range(int(k)))
    rng.shuffle(order)
    lease = TaskLease(task_id=task.id, annotator_id=annotator_id, shown_order=order,
                      state=LeaseState.active, leased_at=now, expires_at=now + ttl)
    with session.begin_nested():
        session.add(lease)
        session.flush()
    return lease


def next_task(
    *,
    session: Session,
    annotator_id: int,
    kind: TaskKind,
    ttl: timedelta,
    gold_rate: float = 0.0,
    rng: random.Random | None = None,
    now: datetime | None = None,
    housekeeping: bool = True,
) -> Offer | None:
    """The annotator's current lease of this kind, else a newly claimed task, else None.

    `housekeeping` first adds queue rows for new tasks and expires overdue leases; a busy
    server may do that once a second instead of on every call (then a lease is offered again
    up to that much after it expires). With nothing to offer, it is always done and retried.
    """
    if not 0.0 <= gold_rate <= 1.0:
        raise InvalidInput("gold_rate must be between 0 and 1")
    if ttl <= timedelta(0):
        raise InvalidInput("a lease's lifetime must be positive")
    rng = rng or random.SystemRandom()
    now = now or utcnow()
    if housekeeping:
        sync_queue(session=session)
        expire_leases(session=session, now=now)
    current = _current_lease(session, annotator_id, kind, now)
    if current is not None:
        return Offer(current[0], current[1], True)
    pools = [True, False] if gold_rate > 0 and rng.random() < gold_rate else [False, True]
    if gold_rate == 0:
        pools = [False]
    for gold in pools:
        try:
            offer = _claim(session, annotator_id=annotator_id, kind=kind, gold=gold, now=now,
                           ttl=ttl, rng=rng)
        except IntegrityError:
            # The same annotator's concurrent request leased this task first: hand back that.
            current = _current_lease(session, annotator_id, kind, now)
            return Offer(current[0], current[1], True) if current else None
        if offer is not None:
            return offer
    if not housekeeping:
        return next_task(session=session, annotator_id=annotator_id, kind=kind, ttl=ttl,
                         gold_rate=gold_rate, rng=rng, now=now, housekeeping=True)
    return None


def lease_of(*, session: Session, task_id: int, annotator_id: int) -> TaskLease:
    """The annotator's lease on the task; 404 when they were never given it."""
    lease = session.exec(select(TaskLease).where(
        TaskLease.task_id == task_id, TaskLease.annotator_id == annotator_id)).first()
    if lease is None:
        raise NotFound(f"task {task_id} is not assigned to you")
    return lease


def check_can_submit(*, session: Session, lease: TaskLease, now: datetime | None = None) -> None:
    """Refuse a label on a skipped task, or on an expired lease whose slot someone else took."""
    now = now or utcnow()
    if lease.state == LeaseState.skipped:
        raise Conflict(f"you skipped task {lease.task_id}")
    expired = lease.state == LeaseState.expired or (
        lease.state == LeaseState.active and _aware(lease.expires_at) <= now)
    if expired:
        task = session.get(Task, lease.task_id)
        assert task is not None
        if not has_free_slot(session=session, task=task, annotator_id=lease.annotator_id,
                             now=now):
            raise Conflict(f"your lease on task {lease.task_id} expired and the task was "
                           "given to another annotator")


def mark_submitted(*, session: Session, lease: TaskLease) -> None:
    lease.state = LeaseState.submitted
    session.add(lease)
    session.flush()


def skip(*, session: Session, task_id: int, annotator_id: int) -> TaskLease:
    """Give a task back: its slot frees up and it is never offered to this annotator again."""
    lease = lease_of(session=session, task_id=task_id, annotator_id=annotator_id)
    if lease.state == LeaseState.submitted:
        raise Conflict(f"task {task_id} is already labelled")
    lease.state = LeaseState.skipped
    session.add(lease)
    session.flush()
    _set_full(session, [task_id], False)
    return lease


def reopen(*, session: Session, task_id: int, annotator_id: int, ttl: timedelta) -> TaskLease:
    """After an undo: the annotator holds the task again, with a fresh lease."""
    lease = lease_of(session=session, task_id=task_id, annotator_id=annotator_id)
    now = utcnow()
    lease.state, lease.leased_at, lease.expires_at = LeaseState.active, now, now + ttl
    session.add(lease)
    session.flush()
    return lease


def remaining(*, session: Session, annotator_id: int, kind: TaskKind) -> int:
    """About how many tasks of this kind the annotator could still be given (from the queue's
    hints: tasks not marked full that they have not labelled, skipped or been given)."""
    mine = exists().where(col(TaskLease.task_id) == TaskQueueEntry.task_id,
                          col(TaskLease.annotator_id) == annotator_id)
    labelled = exists().where(col(Label.task_id) == TaskQueueEntry.task_id,
                              col(Label.annotator_id) == annotator_id)
    return int(session.execute(
        sa_select(func.count()).select_from(TaskQueueEntry).where(
            col(TaskQueueEntry.kind) == kind,
            or_(col(TaskQueueEntry.gold), ~col(TaskQueueEntry.full)), ~mine, ~labelled)
    ).scalar_one())


def gold_accuracy(*, session: Session) -> dict[int, tuple[int, int]]:
    """annotator id -> (correct, answered) over gold tasks, in canonical positions."""
    rows = session.exec(
        select(Label, Task).join(Task, col(Task.id) == col(Label.task_id)).where(is_gold_clause())
    ).all()
    out: dict[int, tuple[int, int]] = {}
    for label, task in rows:
        gold = task.gold or {}
        right = (label.ranks == gold.get("ranks")) if "ranks" in gold else (
            label.choice == gold.get("choice"))
        correct, total = out.get(label.annotator_id, (0, 0))
        out[label.annotator_id] = (correct + int(right), total + 1)
    return out
