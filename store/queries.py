"""Read-only queries over the store (counts, summaries) shared by the CLI and the web app."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, col, select

from store.models import Annotator, Completion, Label, LabelStatus, Prompt, Task


def store_counts(session: Session) -> dict[str, int]:
    """Row counts, tasks by kind, and labels by (task kind, annotator kind, status)."""
    counts: dict[str, int] = {}
    for name, model in (("prompts", Prompt), ("completions", Completion), ("tasks", Task),
                        ("labels", Label), ("annotators", Annotator)):
        counts[name] = session.exec(select(func.count()).select_from(model)).one()
    for kind, n in session.exec(select(Task.kind, func.count()).group_by(Task.kind)).all():
        counts[f"tasks.{kind}"] = n
    rows = session.exec(
        select(Task.kind, Annotator.kind, Label.status, func.count())
        .join(Task, col(Task.id) == col(Label.task_id))
        .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
        .group_by(Task.kind, Annotator.kind, Label.status)
    ).all()
    for task_kind, annotator_kind, status, n in sorted(rows, key=lambda r: str(r)):
        suffix = "" if status == LabelStatus.submitted else f".{status}"
        counts[f"labels.{task_kind}.{annotator_kind}{suffix}"] = n
    return counts
