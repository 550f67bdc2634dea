"""Judge calibration in the store: the JudgeCalibration rows, the queries calibration needs, and
routing tasks to humans by raising Task.priority.

Like store/repo.py, every function takes the session as a keyword (`*, session`) and never
commits; the caller owns the transaction (`Database.write()` / `Database.read()`).

    with db.write() as session:
        record_calibration(session=session, annotator_id=7, n_tasks=120, metrics={...})
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from store.errors import InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    Completion,
    JudgeCalibration,
    Label,
    LabelStatus,
    Task,
    TaskItem,
    TaskKind,
)
from store.values import content_text


def record_calibration(*, session: Session, annotator_id: int, n_tasks: int,
                       metrics: dict[str, Any]) -> JudgeCalibration:
    """Append a calibration result for a judge identity (the newest one is the current one)."""
    annotator = session.get(Annotator, annotator_id)
    if annotator is None:
        raise NotFound(f"annotator {annotator_id} does not exist")
    if annotator.kind == AnnotatorKind.human:
        raise InvalidInput("calibrations are for AI and rule judges, not humans")
    if n_tasks < 0:
        raise InvalidInput("n_tasks must be >= 0")
    row = JudgeCalibration(annotator_id=annotator_id, n_tasks=n_tasks, metrics=metrics)
    session.add(row)
    session.flush()
    return row


def latest_calibration(*, session: Session, annotator_id: int) -> JudgeCalibration | None:
    return session.exec(
        select(JudgeCalibration).where(JudgeCalibration.annotator_id == annotator_id)
        .order_by(col(JudgeCalibration.created_at).desc(), col(JudgeCalibration.id).desc())
    ).first()


def latest_agreements(*, session: Session) -> dict[int, float | None]:
    """annotator_id -> agreement with humans from the judge's newest calibration.

    The export uses this to weight or filter AI/rule labels by their judge's measured agreement
    (a judge never calibrated is absent).
    """
    rows = session.exec(
        select(JudgeCalibration).order_by(col(JudgeCalibration.created_at),
                                          col(JudgeCalibration.id))
    ).all()
    out: dict[int, float | None] = {}
    for row in rows:  # later rows overwrite earlier ones
        agreement = (row.metrics or {}).get("agreement")
        out[row.annotator_id] = float(agreement) if isinstance(agreement, int | float) else None
    return out


def label_weight(kind: AnnotatorKind, annotator_id: int, agreements: dict[int, float | None],
                 *, min_agreement: float = 0.0) -> float:
    """The vote weight of a label in an export: 1 for humans; a judge's measured agreement for
    AI/rule labels (0, i.e. dropped, when uncalibrated or below `min_agreement`)."""
    if kind == AnnotatorKind.human:
        return 1.0
    agreement = agreements.get(annotator_id)
    if agreement is None or agreement < min_agreement:
        return 0.0
    return agreement


def raise_task_priority(*, session: Session, task_ids: Iterable[int], priority: int) -> int:
    """Route tasks to the human queue first: priority = max(priority, current). Returns how
    many tasks changed. Never lowers a priority someone else raised."""
    ids = sorted(set(task_ids))
    changed = 0
    for start in range(0, len(ids), 500):
        for task in session.exec(select(Task).where(col(Task.id).in_(ids[start:start + 500]))):
            if task.priority < priority:
                task.priority = priority
                session.add(task)
                changed += 1
    session.flush()
    return changed


# ---------------------------------------------------------------------------------------------
# Calibration queries


@dataclass
class CalibrationItem:
    """One task a judge labelled, with what calibration compares it to."""

    task_id: int
    kind: TaskKind
    gold: dict[str, Any] | None
    judge_status: LabelStatus
    judge_choice: str | None
    judge_ranks: list[int] | None
    judge_details: dict[str, Any] | None
    response_lengths: list[int]  # characters, canonical order
    human_choices: list[str] = field(default_factory=list)
    human_ranks: list[list[int]] = field(default_factory=list)


def calibration_items(*, session: Session, annotator_id: int,
                      kinds: Sequence[TaskKind] | None = None,
                      reference_annotator_id: int | None = None) -> list[CalibrationItem]:
    """Every task the judge labelled (valid or invalid), with its human labels and gold.

    With `reference_annotator_id` (another judge, e.g. a rule judge that is exact on the task),
    that judge's submitted labels stand in for the human labels and gold is left out, so the
    judge is calibrated against the reference judge on the tasks both labelled.
    """
    query = (select(Label, Task).join(Task, col(Task.id) == col(Label.task_id))
             .where(Label.annotator_id == annotator_id).order_by(col(Task.id)))
    if kinds:
        query = query.where(col(Task.kind).in_(list(kinds)))
    items: dict[int, CalibrationItem] = {}
    for label, task in session.exec(query).all():
        assert task.id is not None
        items[task.id] = CalibrationItem(
            task_id=task.id, kind=task.kind,
            gold=None if reference_annotator_id is not None else task.gold,
            judge_status=label.status,
            judge_choice=label.choice, judge_ranks=label.ranks, judge_details=label.details,
            response_lengths=[])
    if not items:
        return []
    ids = list(items)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for item, completion in session.exec(
            select(TaskItem, Completion).join(Completion,
                                              col(Completion.id) == col(TaskItem.completion_id))
            .where(col(TaskItem.task_id).in_(chunk))
            .order_by(col(TaskItem.task_id), col(TaskItem.position))
        ).all():
            items[item.task_id].response_lengths.append(len(content_text(completion.content)))
        references = (select(Label).where(Label.annotator_id == reference_annotator_id)
                      if reference_annotator_id is not None else
                      select(Label).join(Annotator, col(Annotator.id) == col(Label.annotator_id))
                      .where(Annotator.kind == AnnotatorKind.human))
        for label in session.exec(
            references.where(col(Label.task_id).in_(chunk), Label.status == LabelStatus.submitted)
            .order_by(col(Label.task_id), col(Label.id))
        ).all():
            target = items[label.task_id]
            if label.choice is not None:
                target.human_choices.append(label.choice)
            if label.ranks is not None:
                target.human_ranks.append(list(label.ranks))
    return list(items.values())


def judge_disagreements(*, session: Session, annotator_ids: Sequence[int],
                        task_ids: Sequence[int] | None = None) -> list[int]:
    """Tasks where two or more of these judges gave different submitted verdicts."""
    if len(annotator_ids) < 2:
        return []
    query = select(Label).where(col(Label.annotator_id).in_(list(annotator_ids)),
                                Label.status == LabelStatus.submitted)
    if task_ids is not None:
        query = query.where(col(Label.task_id).in_(list(task_ids)))
    verdicts: dict[int, set[str]] = defaultdict(set)
    for label in session.exec(query).all():
        verdicts[label.task_id].add(label.choice if label.choice is not None
                                    else ",".join(map(str, label.ranks or [])))
    return sorted(task_id for task_id, values in verdicts.items() if len(values) > 1)
