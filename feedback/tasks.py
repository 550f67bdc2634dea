"""The tasks a judge works on: the `--tasks` filter, the pending tasks, the judge's identity.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise,dataset=math,limit=100

`load_pending` reads the tasks of the judge's kinds that pass the filter and that this judge has
not labelled yet, as `JudgeTask`s (prompt and responses in canonical order); a rerun therefore
only sees what is missing. `ensure_annotator` gets or creates the judge's annotator row through
store.repo and refuses a different configuration under the same name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from feedback.config import JudgeConfig, JudgeConfigError, RuleJudgeConfig
from feedback.judge import conversation_text
from store import repo
from store.errors import InvalidInput
from store.models import (
    Annotator,
    AnnotatorKind,
    Completion,
    Label,
    Prompt,
    Task,
    TaskItem,
    TaskKind,
)
from store.values import content_text


@dataclass(frozen=True)
class JudgeTask:
    """What a judge sees of a task: the prompt and the responses in canonical order."""

    task_id: int
    task_key: str
    kind: str
    question: str
    responses: tuple[str, ...]
    reference: str | None = None
    prompt: Any = None  # the raw prompt content (text or chat messages)


@dataclass(frozen=True)
class TaskFilter:
    """`--tasks` filter: comma-separated key=value, e.g. `kind=pairwise,dataset=math,limit=100`.

    Keys: kind, dataset, split, round, source, ids (a-b), limit, gold (1: only gold tasks),
    human (1: only tasks with a human label, i.e. a calibration set).
    """

    kinds: tuple[str, ...] = ()
    dataset: str | None = None
    split: str | None = None
    round_id: int | None = None
    source: str | None = None
    id_min: int | None = None
    id_max: int | None = None
    limit: int | None = None
    gold_only: bool = False
    human_labelled_only: bool = False

    @classmethod
    def parse(cls, text: str | None) -> TaskFilter:
        if not text:
            return cls()
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise InvalidInput(f"--tasks: expected key=value, got {part!r}")
            try:
                if key == "kind":
                    values["kinds"] = (*values.get("kinds", ()), *value.split("|"))
                elif key in ("dataset", "split", "source"):
                    values[key] = value
                elif key == "round":
                    values["round_id"] = int(value)
                elif key == "ids":
                    low, _, high = value.partition("-")
                    values["id_min"] = int(low) if low else None
                    values["id_max"] = int(high) if high else None
                elif key == "limit":
                    values["limit"] = int(value)
                elif key in ("gold", "human"):
                    flag = value.lower() in ("1", "true", "yes")
                    values["gold_only" if key == "gold" else "human_labelled_only"] = flag
                else:
                    raise InvalidInput(f"--tasks: unknown key {key!r}")
            except ValueError:
                raise InvalidInput(f"--tasks: bad value for {key}: {value!r}") from None
        unknown_kinds = set(values.get("kinds", ())) - {k.value for k in TaskKind}
        if unknown_kinds:
            raise InvalidInput(f"--tasks: unknown kind {sorted(unknown_kinds)}")
        return cls(**values)


def load_pending(session: Session, *, annotator_id: int, kinds: Sequence[str],
                 task_filter: TaskFilter) -> list[JudgeTask]:
    """Tasks of these kinds that pass the filter and this annotator has not labelled yet."""
    if task_filter.kinds:
        kinds = [k for k in kinds if k in task_filter.kinds]
    labelled = select(Label.task_id).where(Label.annotator_id == annotator_id)
    query = (select(Task, Prompt).join(Prompt, col(Prompt.id) == col(Task.prompt_id))
             .where(col(Task.kind).in_([TaskKind(k) for k in kinds]),
                    col(Task.id).not_in(labelled))
             .order_by(col(Task.id)))
    f = task_filter
    for column, value in ((Prompt.dataset, f.dataset), (Prompt.split, f.split),
                          (Task.round_id, f.round_id), (Task.source, f.source)):
        if value is not None:  # an unset key does not filter
            query = query.where(col(column) == value)
    if f.id_min is not None:
        query = query.where(col(Task.id) >= f.id_min)
    if f.id_max is not None:
        query = query.where(col(Task.id) <= f.id_max)
    if f.gold_only:
        query = query.where(col(Task.gold).is_not(None))
    if f.human_labelled_only:
        humans = (select(Label.task_id).join(Annotator, col(Annotator.id) == col(
            Label.annotator_id)).where(Annotator.kind == AnnotatorKind.human))
        query = query.where(col(Task.id).in_(humans))
    if f.limit is not None:
        query = query.limit(f.limit)
    rows = session.exec(query).all()
    if not rows:
        return []
    texts: dict[int, list[str]] = {task.id or 0: [] for task, _ in rows}
    ids = list(texts)
    for start in range(0, len(ids), 500):
        for item, completion in session.exec(
            select(TaskItem, Completion)
            .join(Completion, col(Completion.id) == col(TaskItem.completion_id))
            .where(col(TaskItem.task_id).in_(ids[start:start + 500]))
            .order_by(col(TaskItem.task_id), col(TaskItem.position))
        ).all():
            texts[item.task_id].append(content_text(completion.content))
    return [JudgeTask(task_id=task.id or 0, task_key=task.task_key, kind=task.kind.value,
                     question=conversation_text(prompt.content),
                     responses=tuple(texts[task.id or 0]), reference=prompt.reference,
                     prompt=prompt.content)
            for task, prompt in rows]


def ensure_annotator(session: Session, config: JudgeConfig) -> Annotator:
    """The judge's annotator row; a different rubric/settings under the same name is refused."""
    kind = AnnotatorKind.rule if isinstance(config, RuleJudgeConfig) else AnnotatorKind.ai
    identity = json.loads(json.dumps(config.identity()))  # as stored: tuples become lists
    annotator = repo.get_or_create_annotator(
        session=session, name=config.annotator_name, kind=kind, model=config.model,
        rubric_version=config.rubric_version, config=identity)
    if annotator.config != identity:
        changed = sorted(k for k in set(identity) | set(annotator.config or {})
                         if (annotator.config or {}).get(k) != identity.get(k))
        raise JudgeConfigError(
            f"judge {config.annotator_name!r} already exists with different settings "
            f"({', '.join(changed)}); bump the rubric/judge version or set a new name")
    return annotator


__all__ = ["JudgeTask", "TaskFilter", "ensure_annotator", "load_pending"]
