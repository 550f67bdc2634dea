"""The feedback store's tables: prompts, policy versions, completions, tasks, labels, audit.

One schema carries pairwise, listwise and binary feedback from humans, AI judges and rule judges,
with the provenance later stages need: which policy version wrote each completion, who or what
labelled it, and in which order the completions were shown. Human and AI labels are rows of the
same `Label` table that differ by their annotator's `kind`; one label per (task, annotator) is a
database constraint, so a human label can never overwrite an AI one or the reverse.

Schema changes go through Alembic (`store/migrations`, `prefloop db upgrade`).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware now (the store keeps and returns UTC on both databases)."""
    return datetime.now(UTC)


def _nullable_json() -> Column[Any]:
    # none_as_null: Python None is stored as SQL NULL, not the JSON literal null, so that
    # `IS NULL` filters see it (migration 0004 converted the rows written before).
    return Column(JSON(none_as_null=True))


def _enum_column(enum_cls: type[enum.Enum], **kw: Any) -> Column[Any]:
    # Stored as VARCHAR + CHECK rather than a native PostgreSQL ENUM: adding a value later is
    # then an ordinary batch migration on both databases.
    return Column(
        SAEnum(enum_cls, native_enum=False, validate_strings=True, length=16,
               values_callable=lambda e: [m.value for m in e]),
        **kw,
    )


class AnnotatorKind(enum.StrEnum):
    human = "human"
    ai = "ai"
    rule = "rule"


class Role(enum.StrEnum):
    annotator = "annotator"
    admin = "admin"


class TaskKind(enum.StrEnum):
    pairwise = "pairwise"
    listwise = "listwise"
    binary = "binary"


class PolicyStatus(enum.StrEnum):
    candidate = "candidate"
    deployed = "deployed"
    retired = "retired"
    rejected = "rejected"


class LabelStatus(enum.StrEnum):
    submitted = "submitted"
    # An AI judge's output that could not be parsed into a verdict: stored and counted, never
    # guessed into a winner, never exported.
    invalid = "invalid"


PAIRWISE_CHOICES = ("a", "b", "tie", "both_bad")
BINARY_CHOICES = ("up", "down")


class Annotator(SQLModel, table=True):
    """Who or what labels: a person (with a role), an AI judge (model + rubric) or a rule."""

    __tablename__ = "annotator"
    __table_args__ = (UniqueConstraint("name", name="uq_annotator_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    kind: AnnotatorKind = Field(sa_column=_enum_column(AnnotatorKind, nullable=False))
    role: Role | None = Field(default=None, sa_column=_enum_column(Role, nullable=True))
    # AI judges: the model and the rubric (prompt template) version; rules: checker + version.
    model: str | None = Field(default=None, max_length=200)
    rubric_version: str | None = Field(default=None, max_length=100)
    config: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class Prompt(SQLModel, table=True):
    """A prompt: plain text or a list of chat messages, tagged with its dataset and split."""

    __tablename__ = "prompt"
    __table_args__ = (
        UniqueConstraint("dataset", "content_hash", name="uq_prompt_dataset_hash"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # str, or [{"role": ..., "content": ...}, ...]
    content: Any = Field(sa_column=Column(JSON, nullable=False))
    content_hash: str = Field(max_length=64)
    dataset: str = Field(default="default", max_length=200)
    split: str = Field(default="train", max_length=50)
    # Reference answer for rule judges (exact / numeric match), when known.
    reference: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


class Round(SQLModel, table=True):
    """One training round of the loop: a state machine stored here (store/rounds.py writes it).

    `state` names the next stage to run (collect, generate, label, build_dataset, train,
    evaluate, decide) or the outcome (promoted, rejected, cancelled). Each stage records its
    outputs under `metrics[<stage>]` in the same transaction that advances `state`, so a resumed
    round knows exactly what was done. `config` is the resolved round config (frozen at start).
    """

    __tablename__ = "round"

    id: int | None = Field(default=None, primary_key=True)
    algo: str = Field(max_length=20)
    state: str = Field(default="collect", max_length=20)
    config: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    metrics: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    error: str | None = Field(default=None, sa_column=Column(Text))
    # What started it: "manual", "interval", "cron", "labels", "demo".
    trigger: str | None = Field(default=None, max_length=40)
    # The folder holding the round's artefacts (dataset + manifest, training run, eval).
    run_dir: str | None = Field(default=None, max_length=1000)
    finished_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class RoundLock(SQLModel, table=True):
    """A lease that lets at most one round run at a time, across processes and machines.

    One row per lock name. A holder takes it in a write transaction when it is free or its lease
    expired, renews it while the round runs (heartbeat) and frees it at the end; a holder that
    died stops renewing, so the lock frees itself after `expires_at`.
    """

    __tablename__ = "round_lock"

    name: str = Field(primary_key=True, max_length=40)
    holder: str | None = Field(default=None, max_length=200)
    round_id: int | None = Field(default=None, foreign_key="round.id")
    acquired_at: datetime | None = None
    expires_at: datetime | None = None


class RoundSchedule(SQLModel, table=True):
    """What the round scheduler of `prefloop up` is set to and where it stands (admin view).

    `label_watermark` is the largest label id seen when the last round started: the label-count
    trigger counts labels with a larger id (ids only grow, so nothing is counted twice).
    """

    __tablename__ = "round_schedule"

    name: str = Field(primary_key=True, max_length=40)
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None
    last_round_id: int | None = Field(default=None, foreign_key="round.id")
    label_watermark: int = 0
    owner: str | None = Field(default=None, max_length=200)
    updated_at: datetime = Field(default_factory=utcnow)


class PolicyVersion(SQLModel, table=True):
    """A policy checkpoint: where its weights are, what it came from, and whether it serves."""

    __tablename__ = "policy_version"
    __table_args__ = (UniqueConstraint("name", name="uq_policy_version_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    base_model: str = Field(max_length=500)
    weights_uri: str | None = Field(default=None, max_length=1000)
    is_adapter: bool = False
    parent_id: int | None = Field(default=None, foreign_key="policy_version.id")
    round_id: int | None = Field(default=None, foreign_key="round.id")
    status: PolicyStatus = Field(
        default=PolicyStatus.candidate, sa_column=_enum_column(PolicyStatus, nullable=False)
    )
    created_at: datetime = Field(default_factory=utcnow)


class Completion(SQLModel, table=True):
    """A response to a prompt, tied to the policy version and settings that wrote it.

    `origin` is `policy:<id>` for generated text and `external:<source>` for imported text;
    identical text from the same origin for the same prompt is stored once.
    """

    __tablename__ = "completion"
    __table_args__ = (
        UniqueConstraint("prompt_id", "origin", "content_hash", name="uq_completion_origin"),
    )

    id: int | None = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    content: Any = Field(sa_column=Column(JSON, nullable=False))
    content_hash: str = Field(max_length=64)
    origin: str = Field(max_length=250)
    policy_version_id: int | None = Field(default=None, foreign_key="policy_version.id")
    generation: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    created_at: datetime = Field(default_factory=utcnow)


class Task(SQLModel, table=True):
    """A unit of labelling work: 2 (pairwise), K (listwise) or 1 (binary) completions of a prompt.

    `task_key` is a hash of (kind, prompt, the set of completions, round), so importing the same
    work twice does not create a second task, and a pair imported in the other order lands on the
    same task.
    """

    __tablename__ = "task"
    __table_args__ = (UniqueConstraint("task_key", name="uq_task_key"),)

    id: int | None = Field(default=None, primary_key=True)
    task_key: str = Field(max_length=64)
    kind: TaskKind = Field(sa_column=_enum_column(TaskKind, nullable=False))
    prompt_id: int = Field(foreign_key="prompt.id", index=True)
    round_id: int | None = Field(default=None, foreign_key="round.id", index=True)
    # How many distinct human annotators should label it (the project's `overlap`).
    overlap: int = 1
    # Gold tasks carry a known answer (same shape as a label value) to measure annotators.
    gold: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    # Higher first; routing puts judge-disagreement tasks in front of humans.
    priority: int = 0
    source: str | None = Field(default=None, max_length=250)
    created_at: datetime = Field(default_factory=utcnow)


class TaskItem(SQLModel, table=True):
    """The completions of a task in their canonical order (position 0..K-1)."""

    __tablename__ = "task_item"
    __table_args__ = (
        UniqueConstraint("task_id", "position", name="uq_task_item_position"),
        UniqueConstraint("task_id", "completion_id", name="uq_task_item_completion"),
    )

    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    position: int
    completion_id: int = Field(foreign_key="completion.id")


class Label(SQLModel, table=True):
    """One annotator's answer to one task, in canonical positions.

    pairwise: `choice` in a/b/tie/both_bad (a = canonical position 0); listwise: `ranks`, the
    1-based rank of each canonical position (ties share a rank); binary: `choice` in up/down.
    `shown_order` lists the canonical positions in the order they were presented (left to
    right), or is null when unknown (imported data).
    """

    __tablename__ = "label"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_label_task_annotator"),
        UniqueConstraint("annotator_id", "idempotency_key", name="uq_label_idempotency"),
        Index("ix_label_created_at", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    status: LabelStatus = Field(
        default=LabelStatus.submitted, sa_column=_enum_column(LabelStatus, nullable=False)
    )
    choice: str | None = Field(default=None, max_length=16)
    ranks: list[int] | None = Field(default=None, sa_column=_nullable_json())
    ratings: list[float] | None = Field(default=None, sa_column=_nullable_json())
    shown_order: list[int] | None = Field(default=None, sa_column=_nullable_json())
    rationale: str | None = Field(default=None, sa_column=Column(Text))
    confidence: float | None = None
    # Judge details (raw verdicts per order, flags), never used to decide the label itself.
    details: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    idempotency_key: str | None = Field(default=None, max_length=200)
    request_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Append-only history of every create/update/delete of a label (triggers refuse edits)."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    entity: str = Field(max_length=40)
    entity_id: int
    action: str = Field(max_length=10)
    actor_id: int | None = Field(default=None, foreign_key="annotator.id")
    request_id: str | None = Field(default=None, max_length=100)
    old: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    new: dict[str, Any] | None = Field(default=None, sa_column=_nullable_json())
    at: datetime = Field(default_factory=utcnow)


class ExportSnapshot(SQLModel, table=True):
    """A written export: its content hash, the filters that made it and the counts it holds."""

    __tablename__ = "export_snapshot"

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(max_length=64, index=True)
    format: str = Field(max_length=30)
    path: str | None = Field(default=None, max_length=1000)
    filters: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    counts: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    rows: int
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    """An API token of an account. Only its sha256 is stored; it expires and can be revoked."""

    __tablename__ = "api_token"
    __table_args__ = (UniqueConstraint("token_hash", name="uq_api_token_hash"),)

    id: int | None = Field(default=None, primary_key=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    token_hash: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class LeaseState(enum.StrEnum):
    active = "active"
    submitted = "submitted"
    skipped = "skipped"
    expired = "expired"


class TaskLease(SQLModel, table=True):
    """A task handed to one annotator: when, until when, and the order it was shown in.

    One row per (task, annotator) ever, so an annotator is never offered the same task twice.
    """

    __tablename__ = "task_lease"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_task_lease_task_annotator"),
        Index("ix_task_lease_state_expires", "state", "expires_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    shown_order: list[int] = Field(sa_column=Column(JSON, nullable=False))
    state: LeaseState = Field(
        default=LeaseState.active, sa_column=_enum_column(LeaseState, nullable=False)
    )
    leased_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class JudgeCalibration(SQLModel, table=True):
    """A judge's measured agreement with human labels, per judge identity (model + rubric)."""

    __tablename__ = "judge_calibration"

    id: int | None = Field(default=None, primary_key=True)
    annotator_id: int = Field(foreign_key="annotator.id", index=True)
    n_tasks: int
    # agreement, cohen_kappa, position_consistency, first_position_win_rate, ...
    metrics: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class TaskQueueEntry(SQLModel, table=True):
    """Assignment's index of tasks (store/assignment.py keeps it): one row per task, with
    `full` set once the task's slots are all taken, so picking the next task scans only tasks
    that may still need labels instead of every task ever created.

    `full` is a hint, never the truth: a candidate's slots are re-counted before it is leased,
    and a row found wrong is corrected. Rows are added lazily for tasks created elsewhere
    (imports, the API) and rebuilt by `assignment.sync_queue(full=True)`.
    """

    __tablename__ = "task_queue"
    __table_args__ = (
        # Scanned in order: highest priority first (minus_priority ascending), oldest first.
        Index("ix_task_queue_pick", "kind", "gold", "full", "minus_priority", "task_id"),
    )

    task_id: int = Field(foreign_key="task.id", primary_key=True, sa_column_kwargs={
        "autoincrement": False})
    kind: TaskKind = Field(sa_column=_enum_column(TaskKind, nullable=False))
    gold: bool = False
    minus_priority: int = 0
    full: bool = False
