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

The hot path (`claim_next`, `lease_for_submit`, `check_submit_lease`, `mark_lease_submitted`)
is SQLAlchemy Core with prebuilt statements and returns plain values; `next_task` is the same
claim with the task and lease as ORM objects.

    with db.write() as session:
        offer = next_task(session=session, annotator_id=7, kind=TaskKind.pairwise,
                          ttl=timedelta(minutes=10))
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Insert, Select, Table, and_, bindparam, exists, false, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from store.errors import Conflict, InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    Completion,
    Label,
    LeaseState,
    Prompt,
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


# ---------------------------------------------------------------------------------------------
# The hot path in SQLAlchemy Core: prebuilt statements with bind parameters (their compiled form
# is cached once), plain tuples back, no ORM objects. About 5 statements a claim instead of ~15.


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_L, _T, _Q = _table(TaskLease), _table(Task), _table(TaskQueueEntry)
_LB, _A, _I = _table(Label), _table(Annotator), _table(TaskItem)
_P, _C = _table(Prompt), _table(Completion)


def _connection(session: Session) -> Connection:
    """The session's connection, with any pending ORM changes flushed so Core sees them."""
    session.flush()
    return session.connection()


def _is_postgres(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


_CURRENT = (
    sa_select(_L.c.task_id, _T.c.prompt_id, _L.c.id, _L.c.shown_order, _L.c.expires_at)
    .join_from(_L, _T, _T.c.id == _L.c.task_id)
    .where(_L.c.annotator_id == bindparam("b_annotator"), _L.c.state == LeaseState.active,
           _L.c.expires_at > bindparam("b_now"), _T.c.kind == bindparam("b_kind"))
    .order_by(_L.c.leased_at)
    .limit(1)
)
_HAS_EXPIRED = (sa_select(_L.c.id).where(_L.c.annotator_id == bindparam("b_annotator"),
                                          _L.c.state == LeaseState.expired).limit(1))
_HUMAN_LABELS = (
    sa_select(func.count()).select_from(_LB.join(_A, _A.c.id == _LB.c.annotator_id))
    .where(_LB.c.task_id == bindparam("b_task"), _A.c.kind == AnnotatorKind.human)
    .scalar_subquery()
)
_OTHERS_LIVE = (
    sa_select(func.count()).select_from(_L)
    .where(_L.c.task_id == bindparam("b_task"), _L.c.state == LeaseState.active,
           _L.c.expires_at > bindparam("b_now"), _L.c.annotator_id != bindparam("b_annotator"))
    .scalar_subquery()
)
# Human labels plus live leases of other annotators on a task: its used slots.
_USED = sa_select(_HUMAN_LABELS + _OTHERS_LIVE)
_ITEMS = sa_select(func.count()).select_from(_I).where(_I.c.task_id == bindparam("b_task"))
_SET_FULL = update(_Q).where(_Q.c.task_id == bindparam("b_task")).values(
    full=bindparam("b_full"))
_REACTIVATE = (
    update(_L)
    .where(_L.c.task_id == bindparam("b_task"), _L.c.annotator_id == bindparam("b_annotator"),
           _L.c.state == LeaseState.expired)
    .values(state=LeaseState.active, leased_at=bindparam("b_now"),
            expires_at=bindparam("b_expires"))
    .returning(_L.c.id, _L.c.shown_order)
)


@functools.cache
def _candidate_query(*, own_expired: bool, postgres: bool, exclude: bool) -> Select[Any]:
    """The first open task of a kind and pool the annotator may get (see `claim_next`)."""
    # One lease row per (task, annotator) ever: "no lease of mine at all", or, on the second
    # pass, "my lease there expired" (then it is the only row, so it is not also a live one).
    my_lease = _L.c.task_id == _Q.c.task_id, _L.c.annotator_id == bindparam("b_annotator")
    lease_filter = (exists().where(*my_lease, _L.c.state == LeaseState.expired) if own_expired
                    else ~exists().where(*my_lease))
    labelled = exists().where(_LB.c.task_id == _Q.c.task_id,
                              _LB.c.annotator_id == bindparam("b_annotator"))
    query = (
        sa_select(_Q.c.task_id, _T.c.overlap, _T.c.prompt_id)
        .join_from(_Q, _T, _T.c.id == _Q.c.task_id)
        .where(_Q.c.kind == bindparam("b_kind"), _Q.c.gold == bindparam("b_gold"),
               _Q.c.full == false(), ~labelled, lease_filter)
    )
    if exclude:
        query = query.where(_Q.c.task_id.not_in(bindparam("b_exclude", expanding=True)))
    query = query.order_by(_Q.c.minus_priority, _Q.c.task_id).limit(1)
    if postgres:
        query = query.with_for_update(skip_locked=True, of=_Q)
    return query


@functools.cache
def _insert_lease(postgres: bool) -> Insert:
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    return (dialect_insert(_L)
            .on_conflict_do_nothing(index_elements=[_L.c.task_id, _L.c.annotator_id])
            .returning(_L.c.id))

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


@dataclass(frozen=True)
class Claim:
    """A lease as the service needs it: the task, and the order its completions are shown in."""

    task_id: int
    prompt_id: int
    kind: TaskKind
    lease_id: int
    shown_order: list[int]
    expires_at: datetime  # aware UTC
    # True when the annotator already held this lease (a reload), False for a fresh claim.
    resumed: bool


# `_claim_pool`'s answer when this annotator's own concurrent request leased the task first.
_RACED = object()


def _current(connection: Connection, annotator_id: int, kind: TaskKind,
             now: datetime) -> Claim | None:
    row = connection.execute(_CURRENT, {"b_annotator": annotator_id, "b_now": now,
                                        "b_kind": kind}).first()
    if row is None:
        return None
    task_id, prompt_id, lease_id, shown_order, expires_at = row
    return Claim(task_id, prompt_id, kind, lease_id, list(shown_order), _aware(expires_at), True)


def _set_full_one(connection: Connection, task_id: int, full: bool) -> None:
    connection.execute(_SET_FULL, {"b_task": task_id, "b_full": full})


def _claim_pool(connection: Connection, *, annotator_id: int, kind: TaskKind, gold: bool,
                now: datetime, ttl: timedelta, rng: random.Random) -> Claim | object | None:
    postgres = _is_postgres(connection)
    for own_expired in (False, True):
        # Tasks this annotator let expire come back to them only when nothing else is left.
        if own_expired and connection.execute(
                _HAS_EXPIRED, {"b_annotator": annotator_id}).first() is None:
            break
        exclude: list[int] = []
        for _ in range(MAX_CLAIM_ATTEMPTS):
            params: dict[str, Any] = {"b_annotator": annotator_id, "b_kind": kind,
                                      "b_gold": gold}
            if exclude:
                params["b_exclude"] = exclude
            row = connection.execute(_candidate_query(
                own_expired=own_expired, postgres=postgres, exclude=bool(exclude)), params
            ).first()
            if row is None:
                break
            task_id, overlap, prompt_id = row
            # Re-count now that the row is locked (a new statement sees the latest commits).
            # Candidates carry no live lease of this annotator, so this counts every slot.
            used = 0 if gold else int(connection.execute(_USED, {
                "b_task": task_id, "b_now": now, "b_annotator": annotator_id}).scalar_one())
            if used >= overlap:
                exclude.append(task_id)
                _set_full_one(connection, task_id, True)  # the hint was stale: correct it
                continue
            taken = _take_lease(connection, task_id=task_id, annotator_id=annotator_id,
                                kind=kind, own_expired=own_expired, now=now, ttl=ttl, rng=rng)
            if taken is None:
                return _RACED
            if not gold and used + 1 >= overlap:
                _set_full_one(connection, task_id, True)
            lease_id, shown_order = taken
            return Claim(task_id, prompt_id, kind, lease_id, shown_order, _aware(now + ttl),
                         False)
    return None


def _take_lease(connection: Connection, *, task_id: int, annotator_id: int, kind: TaskKind,
                own_expired: bool, now: datetime, ttl: timedelta, rng: random.Random
                ) -> tuple[int, list[int]] | None:
    """(lease id, shown order) of a new lease, or of the annotator's own expired one taken up
    again; None when their own concurrent request got there first."""
    if own_expired:
        row = connection.execute(_REACTIVATE, {"b_task": task_id, "b_annotator": annotator_id,
                                               "b_now": now, "b_expires": now + ttl}).first()
        return None if row is None else (row[0], list(row[1]))
    k = {TaskKind.pairwise: 2, TaskKind.binary: 1}.get(kind) or int(
        connection.execute(_ITEMS, {"b_task": task_id}).scalar_one())
    order = list(range(k))
    rng.shuffle(order)
    lease_id = connection.execute(_insert_lease(_is_postgres(connection)), {
        "task_id": task_id, "annotator_id": annotator_id, "shown_order": order,
        "state": LeaseState.active, "leased_at": now, "expires_at": now + ttl,
    }).scalar()
    return None if lease_id is None else (int(lease_id), order)


def claim_next(
    *,
    session: Session,
    annotator_id: int,
    kind: TaskKind,
    ttl: timedelta,
    gold_rate: float = 0.0,
    rng: random.Random | None = None,
    now: datetime | None = None,
    housekeeping: bool = True,
) -> Claim | None:
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
    connection = _connection(session)
    current = _current(connection, annotator_id, kind, now)
    if current is not None:
        return current
    pools = [True, False] if gold_rate > 0 and rng.random() < gold_rate else [False, True]
    if gold_rate == 0:
        pools = [False]
    for gold in pools:
        claim = _claim_pool(connection, annotator_id=annotator_id, kind=kind, gold=gold,
                            now=now, ttl=ttl, rng=rng)
        if claim is _RACED:
            # The same annotator's concurrent request leased this task first: hand back that.
            return _current(connection, annotator_id, kind, now)
        if isinstance(claim, Claim):
            return claim
    if not housekeeping:
        return claim_next(session=session, annotator_id=annotator_id, kind=kind, ttl=ttl,
                          gold_rate=gold_rate, rng=rng, now=now, housekeeping=True)
    return None


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
    """`claim_next` with the task and lease as ORM objects (same rules, same arguments)."""
    claim = claim_next(session=session, annotator_id=annotator_id, kind=kind, ttl=ttl,
                       gold_rate=gold_rate, rng=rng, now=now, housekeeping=housekeeping)
    if claim is None:
        return None
    # populate_existing: the rows were written by Core statements, not through this session.
    task = session.get(Task, claim.task_id, populate_existing=True)
    lease = session.get(TaskLease, claim.lease_id, populate_existing=True)
    assert task is not None and lease is not None
    return Offer(task, lease, claim.resumed)


def task_contents(*, connection: Connection, task_id: int
                  ) -> tuple[Any, list[Any]] | None:
    """(prompt content, completion contents in the task's canonical order), in one query."""
    rows = connection.execute(_CONTENTS, {"b_task": task_id}).all()
    if not rows:
        return None
    return rows[0][0], [content for _prompt, content in rows]


_CONTENTS = (
    sa_select(_P.c.content, _C.c.content)
    .select_from(_T.join(_P, _P.c.id == _T.c.prompt_id)
                 .join(_I, _I.c.task_id == _T.c.id)
                 .join(_C, _C.c.id == _I.c.completion_id))
    .where(_T.c.id == bindparam("b_task"))
    .order_by(_I.c.position)
)


# ---------------------------------------------------------------------------------------------
# Submitting on a lease


@dataclass(frozen=True)
class SubmitLease:
    """What a submit needs to know about the caller's lease and its task, read in one query."""

    lease_id: int
    task_id: int
    annotator_id: int
    state: LeaseState
    expires_at: datetime  # aware UTC
    shown_order: list[int]
    kind: TaskKind
    overlap: int
    gold: bool
    k: int  # number of completions


_SUBMIT_LEASE = (
    sa_select(_L.c.id, _L.c.state, _L.c.expires_at, _L.c.shown_order, _T.c.kind,
              _T.c.overlap, _T.c.gold.is_not(None),
              sa_select(func.count()).select_from(_I).where(_I.c.task_id == _L.c.task_id)
              .scalar_subquery())
    .join_from(_L, _T, _T.c.id == _L.c.task_id)
    .where(_L.c.task_id == bindparam("b_task"), _L.c.annotator_id == bindparam("b_annotator"))
)
_MARK_SUBMITTED = update(_L).where(_L.c.id == bindparam("b_lease")).values(
    state=LeaseState.submitted)


def lease_for_submit(*, session: Session, task_id: int, annotator_id: int) -> SubmitLease:
    """The annotator's lease on the task with the task's kind and size; 404 when they were
    never given it (which also covers a task that does not exist)."""
    row = _connection(session).execute(
        _SUBMIT_LEASE, {"b_task": task_id, "b_annotator": annotator_id}).first()
    if row is None:
        raise NotFound(f"task {task_id} is not assigned to you")
    lease_id, state, expires_at, shown_order, kind, overlap, gold, k = row
    return SubmitLease(lease_id, task_id, annotator_id, LeaseState(state), _aware(expires_at),
                       list(shown_order), TaskKind(kind), overlap, bool(gold), int(k))


def check_submit_lease(*, session: Session, lease: SubmitLease,
                       now: datetime | None = None) -> None:
    """`check_can_submit` for a `SubmitLease`: refuse a skipped task, or an expired lease whose
    slot someone else took (the slots are only counted when the lease has expired)."""
    now = now or utcnow()
    if lease.state == LeaseState.skipped:
        raise Conflict(f"you skipped task {lease.task_id}")
    expired = lease.state == LeaseState.expired or (
        lease.state == LeaseState.active and lease.expires_at <= now)
    if expired and not lease.gold:
        used = int(_connection(session).execute(_USED, {
            "b_task": lease.task_id, "b_now": now, "b_annotator": lease.annotator_id,
        }).scalar_one())
        if used >= lease.overlap:
            raise Conflict(f"your lease on task {lease.task_id} expired and the task was "
                           "given to another annotator")


def mark_lease_submitted(*, session: Session, lease_id: int) -> None:
    _connection(session).execute(_MARK_SUBMITTED, {"b_lease": lease_id})

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
