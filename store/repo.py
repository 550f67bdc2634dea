"""The store's core write functions, and the map of who writes which rows.

Every insert, update and delete of the project goes through a function of `store/`; no module
outside it adds a row or commits one. Which module writes what:

- here (store/repo.py): annotators (`get_or_create_annotator`), prompts, completions, tasks and
  their items, policy versions, labels with their audit events (`record_label`, wrapped by
  `submit_label`; `update_label`, `delete_label`) and export snapshots (`record_export`);
- store/judge_labels.py: every label a judge stores, batch judges (feedback/batch.py) and
  ensembles (feedback/ensemble.py) alike, through `submit_label`, and the routing of those
  tasks to humans; store/calibration.py: judge calibrations and task priorities (routing);
- store/accounts.py: API tokens; store/assignment.py: task leases and the task queue;
  store/deployments.py: policy status changes with their audit events; store/rounds.py: rounds,
  their state moves and the round lock; store/bulk.py: an import's batches (prompts,
  completions, tasks, labels with their audit events, checked row by row in store/import_rows.py)
  with the same get-or-create and label semantics as the functions here, in multi-row
  statements; store/exporting.py: export snapshots, through `record_export`. The web service's
  human labels go through `record_label` (app/).

Each function takes the session as a keyword (`*, session`) and never commits: the caller owns
the transaction (`Database.write()` or `Database.run_write`), so one submit is one transaction.
Creations that may race with another writer (`get_or_create_*`) run their insert inside a
SAVEPOINT and, on a unique-key clash, read back the row the other writer stored; a label
(`record_label`, in SQLAlchemy Core, which `submit_label` wraps) is an INSERT ... ON CONFLICT DO
NOTHING RETURNING followed, when nothing was inserted, by reading the label that is there. Both
are safe on PostgreSQL's concurrent transactions as well as on SQLite's single writer.

    with db.write() as session:
        prompt = get_or_create_prompt(session=session, content="What is 2 + 2?")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Insert, Table, bindparam, func, insert, or_
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from store.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    AuditEvent,
    Completion,
    ExportSnapshot,
    Label,
    LabelStatus,
    PolicyStatus,
    PolicyVersion,
    Prompt,
    Role,
    Task,
    TaskItem,
    TaskKind,
    utcnow,
)
from store.values import (
    canonical_json,
    content_hash,
    sha256_hex,
    validate_choice,
    validate_content,
    validate_ranks,
    validate_shown_order,
)

M = TypeVar("M", bound=SQLModel)

MAX_RATIONALE_CHARS = 10_000
MAX_LISTWISE_K = 16


def _insert_or_get(
    session: Session, row: M, find_existing: Callable[[], M | None]
) -> tuple[M, bool]:
    """Insert `row` in a savepoint; if a unique key says it exists, return the stored one."""
    existing = find_existing()
    if existing is not None:
        return existing, False
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        existing = find_existing()
        if existing is None:  # a different constraint failed: a real error, not a race
            raise
        return existing, False
    return row, True


# ---------------------------------------------------------------------------------------------
# Annotators, prompts, policies, completions


def get_or_create_annotator(
    *,
    session: Session,
    name: str,
    kind: AnnotatorKind,
    role: Role | None = None,
    model: str | None = None,
    rubric_version: str | None = None,
    config: dict[str, Any] | None = None,
) -> Annotator:
    """The annotator called `name`, created on first use. An existing name of another kind is
    refused, so an AI judge can never write under a human's identity."""
    if not name or len(name) > 200:
        raise InvalidInput("an annotator name must have 1 to 200 characters")
    kind = AnnotatorKind(kind)
    if kind == AnnotatorKind.human and role is None:
        role = Role.annotator
    row = Annotator(
        name=name, kind=kind, role=role, model=model, rubric_version=rubric_version, config=config
    )
    annotator, _ = _insert_or_get(
        session, row, lambda: session.exec(select(Annotator).where(Annotator.name == name)).first()
    )
    if annotator.kind != kind:
        raise Conflict(
            f"annotator {name!r} exists with kind {annotator.kind.value}, not {kind.value}"
        )
    return annotator


def get_or_create_prompt(
    *,
    session: Session,
    content: Any,
    dataset: str = "default",
    split: str = "train",
    reference: str | None = None,
) -> Prompt:
    content = validate_content(content, what="prompt")
    digest = content_hash(content)
    row = Prompt(content=content, content_hash=digest, dataset=dataset, split=split,
                 reference=reference)
    prompt, _ = _insert_or_get(
        session,
        row,
        lambda: session.exec(
            select(Prompt).where(Prompt.dataset == dataset, Prompt.content_hash == digest)
        ).first(),
    )
    return prompt


def create_policy_version(
    *,
    session: Session,
    name: str,
    base_model: str,
    weights_uri: str | None = None,
    is_adapter: bool = False,
    parent_id: int | None = None,
    round_id: int | None = None,
    status: PolicyStatus = PolicyStatus.candidate,
) -> PolicyVersion:
    if session.exec(select(PolicyVersion).where(PolicyVersion.name == name)).first():
        raise Conflict(f"policy version {name!r} already exists")
    if parent_id is not None and session.get(PolicyVersion, parent_id) is None:
        raise NotFound(f"parent policy version {parent_id} does not exist")
    policy = PolicyVersion(
        name=name, base_model=base_model, weights_uri=weights_uri, is_adapter=is_adapter,
        parent_id=parent_id, round_id=round_id, status=status,
    )
    session.add(policy)
    session.flush()
    return policy


def set_policy_status(*, session: Session, policy_id: int, status: PolicyStatus) -> PolicyVersion:
    """Change a policy's status; deploying one retires whichever was deployed before."""
    policy = session.get(PolicyVersion, policy_id)
    if policy is None:
        raise NotFound(f"policy version {policy_id} does not exist")
    if status == PolicyStatus.deployed:
        for other in session.exec(
            select(PolicyVersion).where(
                PolicyVersion.status == PolicyStatus.deployed, PolicyVersion.id != policy_id
            )
        ):
            other.status = PolicyStatus.retired
            session.add(other)
    policy.status = status
    session.add(policy)
    session.flush()
    return policy


def get_or_create_completion(
    *,
    session: Session,
    prompt_id: int,
    content: Any,
    origin: str,
    policy_version_id: int | None = None,
    generation: dict[str, Any] | None = None,
) -> Completion:
    """A completion of `prompt_id`; `origin` is `policy:<id>` or `external:<source>`."""
    content = validate_content(content, what="completion")
    digest = content_hash(content)
    row = Completion(
        prompt_id=prompt_id, content=content, content_hash=digest, origin=origin,
        policy_version_id=policy_version_id, generation=generation,
    )
    completion, _ = _insert_or_get(
        session,
        row,
        lambda: session.exec(
            select(Completion).where(
                Completion.prompt_id == prompt_id,
                Completion.origin == origin,
                Completion.content_hash == digest,
            )
        ).first(),
    )
    return completion


# ---------------------------------------------------------------------------------------------
# Tasks


EXPECTED_COMPLETIONS = {TaskKind.pairwise: (2, 2), TaskKind.binary: (1, 1),
                        TaskKind.listwise: (2, MAX_LISTWISE_K)}


def task_key(kind: TaskKind, prompt_id: int, completion_ids: Sequence[int],
             round_id: int | None) -> str:
    # The set, not the sequence: a pair imported as (x, y) and later as (y, x) is one task.
    return sha256_hex(canonical_json([kind.value, prompt_id, sorted(completion_ids), round_id]))


def get_or_create_task(
    *,
    session: Session,
    kind: TaskKind,
    prompt_id: int,
    completion_ids: Sequence[int],
    round_id: int | None = None,
    overlap: int = 1,
    gold: dict[str, Any] | None = None,
    priority: int = 0,
    source: str | None = None,
) -> tuple[Task, bool]:
    """The task over these completions (created in this canonical order) and whether it is new."""
    kind = TaskKind(kind)
    low, high = EXPECTED_COMPLETIONS[kind]
    if not low <= len(completion_ids) <= high:
        raise InvalidInput(f"a {kind.value} task needs {low}-{high} completions, "
                           f"got {len(completion_ids)}")
    if len(set(completion_ids)) != len(completion_ids):
        raise InvalidInput("a task cannot show the same completion twice")
    if overlap < 1:
        raise InvalidInput("overlap must be at least 1")
    completions = session.exec(
        select(Completion).where(col(Completion.id).in_(list(completion_ids)))
    ).all()
    if len(completions) != len(completion_ids):
        raise NotFound("a completion of the task does not exist")
    if any(c.prompt_id != prompt_id for c in completions):
        raise InvalidInput("every completion of a task must answer the task's prompt")
    if gold is not None:
        gold = normalise_label_value(kind, len(completion_ids), gold)
    key = task_key(kind, prompt_id, completion_ids, round_id)
    row = Task(task_key=key, kind=kind, prompt_id=prompt_id, round_id=round_id, overlap=overlap,
               gold=gold, priority=priority, source=source)
    task, created = _insert_or_get(
        session, row, lambda: session.exec(select(Task).where(Task.task_key == key)).first()
    )
    if created:
        assert task.id is not None  # flushed
        for position, completion_id in enumerate(completion_ids):
            session.add(TaskItem(task_id=task.id, position=position, completion_id=completion_id))
        session.flush()
    return task, created


def task_completion_ids(*, session: Session, task_id: int) -> list[int]:
    items = session.exec(
        select(TaskItem).where(TaskItem.task_id == task_id).order_by(col(TaskItem.position))
    ).all()
    return [item.completion_id for item in items]


# ---------------------------------------------------------------------------------------------
# Labels


def normalise_label_value(kind: TaskKind, k: int, value: dict[str, Any]) -> dict[str, Any]:
    """Validate a canonical label value: {"choice"} or {"ranks", "ratings"?}; returns it clean."""
    if not isinstance(value, dict):
        raise InvalidInput("a label value must be an object")
    if kind == TaskKind.listwise:
        unknown = set(value) - {"ranks", "ratings"}
        if unknown:
            raise InvalidInput(f"unexpected fields for a listwise label: {sorted(unknown)}")
        out: dict[str, Any] = {"ranks": validate_ranks(value.get("ranks"), k)}
        if value.get("ratings") is not None:
            ratings = value["ratings"]
            if not isinstance(ratings, list) or len(ratings) != k:
                raise InvalidInput(f"ratings must be a list of {k} numbers")
            out["ratings"] = [float(r) for r in ratings]
        return out
    unknown = set(value) - {"choice"}
    if unknown:
        raise InvalidInput(f"unexpected fields for a {kind.value} label: {sorted(unknown)}")
    return {"choice": validate_choice(kind, value.get("choice"))}


def label_snapshot(label: Label) -> dict[str, Any]:
    """What the audit trail records of a label."""
    return {
        "task_id": label.task_id, "annotator_id": label.annotator_id,
        "status": label.status.value, "choice": label.choice, "ranks": label.ranks,
        "ratings": label.ratings, "shown_order": label.shown_order,
        "rationale": label.rationale, "confidence": label.confidence,
    }


@dataclass(frozen=True)
class SubmitResult:
    label: Label
    # True when an earlier submit with the same idempotency key and body is being replayed.
    replayed: bool


@dataclass(frozen=True)
class StoredLabel:
    """A label as `record_label` returns it: plain values, no ORM object."""

    id: int
    task_id: int
    annotator_id: int
    choice: str | None
    ranks: list[int] | None
    ratings: list[float] | None
    shown_order: list[int] | None
    rationale: str | None
    created_at: datetime  # aware UTC
    # True when an earlier submit with the same idempotency key and body is being replayed.
    replayed: bool


@dataclass(frozen=True)
class TaskShape:
    """A task's kind and number of completions, when the caller has already read them."""

    kind: TaskKind
    k: int


def _request_hash(task_id: int, status: LabelStatus, value: dict[str, Any],
                  shown_order: list[int] | None, rationale: str | None,
                  confidence: float | None) -> str:
    return sha256_hex(canonical_json({
        "task_id": task_id, "status": status.value, "value": value, "shown_order": shown_order,
        "rationale": rationale, "confidence": confidence,
    }))


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_LABEL, _TASK, _ITEM = _table(Label), _table(Task), _table(TaskItem)
_ANNOTATOR, _AUDIT = _table(Annotator), _table(AuditEvent)
_TASK_SHAPE = sa_select(
    _TASK.c.kind,
    sa_select(func.count()).select_from(_ITEM).where(_ITEM.c.task_id == _TASK.c.id)
    .scalar_subquery(),
    sa_select(_ANNOTATOR.c.id).where(_ANNOTATOR.c.id == bindparam("b_annotator"))
    .scalar_subquery(),
).where(_TASK.c.id == bindparam("b_task"))
_LABEL_COLUMNS = (_LABEL.c.id, _LABEL.c.task_id, _LABEL.c.idempotency_key,
                  _LABEL.c.request_hash, _LABEL.c.choice, _LABEL.c.ranks, _LABEL.c.ratings,
                  _LABEL.c.shown_order, _LABEL.c.rationale, _LABEL.c.created_at)
# The labels that already answer a submit: the same key, or the same task, of this annotator
# (with no key, `= NULL` matches nothing and only the task counts).
_EXISTING = sa_select(*_LABEL_COLUMNS).where(
    _LABEL.c.annotator_id == bindparam("b_annotator"),
    or_(_LABEL.c.idempotency_key == bindparam("b_key"),
        _LABEL.c.task_id == bindparam("b_task")))
_INSERT_AUDIT = insert(_AUDIT)


@functools.cache
def _insert_label(postgres: bool) -> Insert:
    # DO NOTHING on any unique key (task+annotator, annotator+idempotency key): the caller then
    # reads what is there and replays or refuses, in the same transaction.
    dialect_insert = pg_insert if postgres else sqlite_insert
    return dialect_insert(_LABEL).on_conflict_do_nothing().returning(_LABEL.c.id)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def record_label(
    *,
    session: Session,
    task_id: int,
    annotator_id: int,
    value: dict[str, Any] | None,
    shown_order: list[int] | None = None,
    rationale: str | None = None,
    confidence: float | None = None,
    details: dict[str, Any] | None = None,
    status: LabelStatus = LabelStatus.submitted,
    idempotency_key: str | None = None,
    request_id: str | None = None,
    shape: TaskShape | None = None,
) -> StoredLabel:
    """`submit_label` in SQLAlchemy Core (same rules, same checks, same audit event), returning
    plain values: an INSERT ... ON CONFLICT DO NOTHING RETURNING and the audit INSERT for a new
    label; one SELECT more for a replay or a refusal.

    `shape` (the task's kind and size) skips reading the task and the annotator; pass it only
    when both were read in this transaction (the web service reads them with the lease).
    """
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise InvalidInput("Idempotency-Key must have 1 to 200 characters")
    if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
        raise InvalidInput(f"rationale is longer than {MAX_RATIONALE_CHARS} characters")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise InvalidInput("confidence must be between 0 and 1")
    session.flush()  # Core statements below must see the session's pending rows
    connection = session.connection()
    if shape is None:
        found = connection.execute(_TASK_SHAPE, {"b_task": task_id,
                                                 "b_annotator": annotator_id}).first()
        if found is None:
            raise NotFound(f"task {task_id} does not exist")
        if found[2] is None:
            raise NotFound(f"annotator {annotator_id} does not exist")
        shape = TaskShape(TaskKind(found[0]), int(found[1]))
    if status == LabelStatus.invalid:
        clean: dict[str, Any] = {}
    elif value is None:
        raise InvalidInput("a submitted label needs a value")
    else:
        clean = normalise_label_value(shape.kind, shape.k, value)
    if shown_order is not None:
        shown_order = validate_shown_order(shown_order, shape.k)
    request_hash = _request_hash(task_id, status, clean, shown_order, rationale, confidence)
    now = utcnow()
    row: dict[str, Any] = {
        "task_id": task_id, "annotator_id": annotator_id, "status": status,
        "choice": clean.get("choice"), "ranks": clean.get("ranks"),
        "ratings": clean.get("ratings"), "shown_order": shown_order, "rationale": rationale,
        "confidence": confidence, "details": details, "idempotency_key": idempotency_key,
        "request_hash": request_hash, "created_at": now, "updated_at": now,
    }
    label_id = connection.execute(
        _insert_label(connection.dialect.name == "postgresql"), row).scalar()
    if label_id is not None:
        snapshot = {"task_id": task_id, "annotator_id": annotator_id, "status": status.value,
                    "choice": row["choice"], "ranks": row["ranks"], "ratings": row["ratings"],
                    "shown_order": shown_order, "rationale": rationale,
                    "confidence": confidence}
        connection.execute(_INSERT_AUDIT, {
            "entity": "label", "entity_id": label_id, "action": "create",
            "actor_id": annotator_id, "request_id": request_id, "new": snapshot, "at": now})
        return StoredLabel(int(label_id), task_id, annotator_id, row["choice"], row["ranks"],
                           row["ratings"], shown_order, rationale, now, replayed=False)
    # A label is already there (stored earlier, or by a concurrent transaction that has now
    # committed): replay it (same key, same body) or refuse.
    rows = connection.execute(_EXISTING, {"b_annotator": annotator_id, "b_key": idempotency_key,
                                          "b_task": task_id}).all()
    by_key = [r for r in rows if idempotency_key is not None and r[2] == idempotency_key]
    if by_key:
        (found_id, found_task, _key, found_hash, choice, ranks, ratings, order, found_rationale,
         created_at) = by_key[0]
        if found_hash != request_hash:
            raise IdempotencyMismatch(
                "this Idempotency-Key was already used with a different request")
        return StoredLabel(found_id, found_task, annotator_id, choice, ranks, ratings, order,
                           found_rationale, _aware(created_at), replayed=True)
    if rows:
        raise Conflict(f"annotator {annotator_id} has already labelled task {task_id}")
    # Not a label conflict, so some other unique key failed: a real error, not a race.
    raise AssertionError(f"label insert for task {task_id} did nothing and no label explains it")


def submit_label(
    *,
    session: Session,
    task_id: int,
    annotator_id: int,
    value: dict[str, Any] | None,
    shown_order: list[int] | None = None,
    rationale: str | None = None,
    confidence: float | None = None,
    details: dict[str, Any] | None = None,
    status: LabelStatus = LabelStatus.submitted,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> SubmitResult:
    """Store one annotator's label for one task, exactly once.

    `value` is canonical: {"choice": ...} or {"ranks": [...], "ratings"?: [...]}; it is None only
    for an `invalid` label (a judge output that could not be parsed). Rules, in order:
    same idempotency key + same body replays the stored label; same key + another body is
    `IdempotencyMismatch`; a second label by the same annotator on the task is `Conflict`.
    The work is `record_label`'s; this returns the stored row as an ORM object.
    """
    stored = record_label(
        session=session, task_id=task_id, annotator_id=annotator_id, value=value,
        shown_order=shown_order, rationale=rationale, confidence=confidence, details=details,
        status=status, idempotency_key=idempotency_key, request_id=request_id)
    # populate_existing: the row was written by a Core statement, not through this session.
    label = session.get(Label, stored.id, populate_existing=True)
    assert label is not None
    return SubmitResult(label, stored.replayed)


def update_label(
    *,
    session: Session,
    label_id: int,
    actor_id: int,
    value: dict[str, Any] | None = None,
    rationale: str | None = None,
    confidence: float | None = None,
    request_id: str | None = None,
) -> Label:
    """Change a label's value/rationale/confidence; the audit trail keeps old and new."""
    label = session.get(Label, label_id)
    if label is None:
        raise NotFound(f"label {label_id} does not exist")
    task = session.get(Task, label.task_id)
    assert task is not None  # foreign key
    old = label_snapshot(label)
    if value is not None:
        k = len(task_completion_ids(session=session, task_id=task.id or 0))
        clean = normalise_label_value(task.kind, k, value)
        label.choice, label.ranks = clean.get("choice"), clean.get("ranks")
        label.ratings = clean.get("ratings")
        label.status = LabelStatus.submitted
    if rationale is not None:
        label.rationale = rationale
    if confidence is not None:
        if not 0.0 <= confidence <= 1.0:
            raise InvalidInput("confidence must be between 0 and 1")
        label.confidence = confidence
    label.updated_at = utcnow()
    session.add(label)
    session.add(AuditEvent(entity="label", entity_id=label_id, action="update",
                           actor_id=actor_id, request_id=request_id, old=old,
                           new=label_snapshot(label)))
    session.flush()
    return label


def delete_label(*, session: Session, label_id: int, actor_id: int,
                 request_id: str | None = None) -> None:
    label = session.get(Label, label_id)
    if label is None:
        raise NotFound(f"label {label_id} does not exist")
    session.add(AuditEvent(entity="label", entity_id=label_id, action="delete",
                           actor_id=actor_id, request_id=request_id, old=label_snapshot(label)))
    session.delete(label)
    session.flush()


def record_export(
    *, session: Session, sha256: str, format: str, path: str | None,
    filters: dict[str, Any], counts: dict[str, Any], rows: int,
) -> ExportSnapshot:
    snapshot = ExportSnapshot(sha256=sha256, format=format, path=path, filters=filters,
                              counts=counts, rows=rows)
    session.add(snapshot)
    session.flush()
    return snapshot
