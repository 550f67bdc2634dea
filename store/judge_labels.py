"""The one writer of judge labels: batch and ensemble judges store their decisions here.

A judge (feedback/batch.py for LLM, rule and reward-model judges, feedback/ensemble.py for
ensembles) decides on a batch of tasks and hands the decisions to `record_judge_labels`, which
stores each one through `repo.submit_label` under the idempotency key `judge:<task_key>` and
raises the priority of the tasks the judge routed to humans, all in the caller's transaction.
One label per (task, judge identity) is a database constraint, so a label another run stored
first is reported as not written instead of failing the batch. Like store/repo.py, the function
takes the session as a keyword and never commits.

    with db.write() as session:
        written = record_judge_labels(session=session, annotator_id=7, priority=10,
                                      labels=[JudgeLabel(task_id=1, task_key="k1",
                                                         value={"choice": "a"})])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session

from store import repo
from store.calibration import raise_task_priority
from store.errors import Conflict, IdempotencyMismatch
from store.models import LabelStatus


@dataclass(frozen=True)
class JudgeLabel:
    """One judge decision, ready to store: a canonical value, or None for an invalid label."""

    task_id: int
    task_key: str
    value: dict[str, Any] | None
    confidence: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    shown_order: list[int] | None = None
    route: bool = False  # raise the task's priority so humans see it first

    @property
    def valid(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class JudgeWrite:
    """What `record_judge_labels` did: per label whether it was stored now, and how many task
    priorities it raised."""

    written: list[bool]
    priority_raised: int


def record_judge_labels(*, session: Session, annotator_id: int, labels: Sequence[JudgeLabel],
                        priority: int) -> JudgeWrite:
    """Store a judge's labels (one per task) and route the newly labelled `route` tasks.

    A label that is already there (the same one replayed, or another run's) is not written
    again and its task is not routed again: the run that stored it did that.
    """
    written: list[bool] = []
    routed: list[int] = []
    for label in labels:
        try:
            result = repo.submit_label(
                session=session, task_id=label.task_id, annotator_id=annotator_id,
                value=label.value,
                status=LabelStatus.submitted if label.valid else LabelStatus.invalid,
                shown_order=label.shown_order, confidence=label.confidence,
                details=label.details, idempotency_key=f"judge:{label.task_key}")
        except (Conflict, IdempotencyMismatch):  # another run labelled it first
            written.append(False)
            continue
        written.append(not result.replayed)  # replayed: the very same label, already stored
        if label.route and not result.replayed:
            routed.append(label.task_id)
    changed = raise_task_priority(session=session, task_ids=routed, priority=priority)
    return JudgeWrite(written, changed)


__all__ = ["JudgeLabel", "JudgeWrite", "record_judge_labels"]
