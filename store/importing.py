"""Import JSONL files into the store: prompts, labelled pairwise/listwise/binary feedback, tasks.

    prefloop import data.jsonl --format pairwise --source ultrafeedback --on-error skip

The formats are in docs/formats.md. The whole file is applied in one write transaction, each row
in its own savepoint: with `on_error="fail"` a single bad row rolls everything back (and every
bad row is still reported, with its line number); with `on_error="skip"` the good rows are
written and the bad ones listed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session

from store import repo
from store.db import Database
from store.errors import InvalidInput, StoreError
from store.models import Annotator, AnnotatorKind, LabelStatus, Prompt, TaskKind
from store.values import ranking_to_ranks, ratings_to_ranks

ImportFormat = Literal["prompts", "pairwise", "listwise", "binary", "tasks"]
IMPORT_FORMATS: tuple[str, ...] = ("prompts", "pairwise", "listwise", "binary", "tasks")
OnError = Literal["fail", "skip"]


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ImportReport:
    format: str
    rows_read: int = 0
    rows_written: int = 0
    errors: list[RowError] = field(default_factory=list)
    # What the rows created (a prompt or completion already stored is not counted again).
    created: Counter[str] = field(default_factory=Counter)
    committed: bool = False


class ImportRejected(StoreError):
    """Raised (and the transaction rolled back) when on_error='fail' and a row was bad."""

    status_code = 422

    def __init__(self, report: ImportReport):
        self.report = report
        super().__init__(f"{len(report.errors)} bad row(s); nothing was written")


@dataclass
class _Context:
    session: Session
    source: str
    annotator_kind: AnnotatorKind
    dataset: str | None
    split: str | None
    overlap: int
    report: ImportReport
    annotators: dict[str, Annotator] = field(default_factory=dict)


def _require(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise InvalidInput(f"missing field {name!r}")
    return row[name]


def _prompt(ctx: _Context, row: dict[str, Any]) -> Prompt:
    dataset = row.get("dataset") or ctx.dataset or "default"
    split = row.get("split") or ctx.split or "train"
    if not isinstance(dataset, str) or not isinstance(split, str):
        raise InvalidInput("dataset and split must be strings")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, str | int | float):
        raise InvalidInput("reference must be a string or a number")
    return repo.get_or_create_prompt(
        session=ctx.session, content=_require(row, "prompt"), dataset=dataset, split=split,
        reference=None if reference is None else str(reference),
    )


def _completion_id(ctx: _Context, prompt: Prompt, content: Any, what: str) -> int:
    try:
        completion = repo.get_or_create_completion(
            session=ctx.session, prompt_id=prompt.id or 0, content=content,
            origin=f"external:{ctx.source}",
        )
    except InvalidInput as exc:
        raise InvalidInput(str(exc).replace("completion", what, 1)) from None
    return completion.id or 0


def _annotator(ctx: _Context, row: dict[str, Any]) -> Annotator:
    name = row.get("annotator") or ctx.source
    kind_name = row.get("annotator_kind") or ctx.annotator_kind.value
    if not isinstance(name, str):
        raise InvalidInput("annotator must be a string")
    if kind_name not in AnnotatorKind.__members__:
        raise InvalidInput("annotator_kind must be one of human, ai, rule")
    if name not in ctx.annotators:
        ctx.annotators[name] = repo.get_or_create_annotator(
            session=ctx.session, name=name, kind=AnnotatorKind(kind_name)
        )
    annotator = ctx.annotators[name]
    if annotator.kind.value != kind_name:
        raise InvalidInput(f"annotator {name!r} is {annotator.kind.value}, not {kind_name}")
    return annotator


def _label(ctx: _Context, row: dict[str, Any], task_id: int, value: dict[str, Any]) -> None:
    annotator = _annotator(ctx, row)
    confidence = row.get("confidence")
    rationale = row.get("rationale")
    if confidence is not None and (isinstance(confidence, bool)
                                   or not isinstance(confidence, int | float)):
        raise InvalidInput("confidence must be a number between 0 and 1")
    if rationale is not None and not isinstance(rationale, str):
        raise InvalidInput("rationale must be a string")
    try:
        repo.submit_label(
            session=ctx.session, task_id=task_id, annotator_id=annotator.id or 0, value=value,
            rationale=rationale, confidence=confidence, status=LabelStatus.submitted,
        )
    except StoreError as exc:
        if exc.status_code == 409:
            raise InvalidInput(
                f"duplicate: annotator {annotator.name!r} already labelled this comparison"
            ) from None
        raise
    ctx.report.created["labels"] += 1


def _task(ctx: _Context, kind: TaskKind, prompt: Prompt, completion_ids: list[int],
          gold: dict[str, Any] | None = None, overlap: int | None = None) -> tuple[int, list[int]]:
    """Get or create the task; return its id and its canonical completion order."""
    if len(set(completion_ids)) != len(completion_ids):
        raise InvalidInput("the same completion appears twice in one row")
    task, created = repo.get_or_create_task(
        session=ctx.session, kind=kind, prompt_id=prompt.id or 0, completion_ids=completion_ids,
        overlap=overlap or ctx.overlap, gold=gold, source=f"import:{ctx.source}",
    )
    ctx.report.created["tasks"] += int(created)
    canonical = repo.task_completion_ids(session=ctx.session, task_id=task.id or 0)
    return task.id or 0, canonical


def _apply_prompts(ctx: _Context, row: dict[str, Any]) -> None:
    _prompt(ctx, row)


def _apply_pairwise(ctx: _Context, row: dict[str, Any]) -> None:
    prompt = _prompt(ctx, row)
    chosen = _completion_id(ctx, prompt, _require(row, "chosen"), "chosen")
    rejected = _completion_id(ctx, prompt, _require(row, "rejected"), "rejected")
    if chosen == rejected:
        raise InvalidInput("chosen and rejected are identical")
    task_id, canonical = _task(ctx, TaskKind.pairwise, prompt, [chosen, rejected])
    _label(ctx, row, task_id, {"choice": "a" if canonical[0] == chosen else "b"})


def _listwise_completions(ctx: _Context, prompt: Prompt, row: dict[str, Any]) -> list[int]:
    completions = _require(row, "completions")
    if not isinstance(completions, list):
        raise InvalidInput("completions must be a list")
    return [_completion_id(ctx, prompt, c, f"completions[{i}]")
            for i, c in enumerate(completions)]


def _apply_listwise(ctx: _Context, row: dict[str, Any]) -> None:
    prompt = _prompt(ctx, row)
    ids = _listwise_completions(ctx, prompt, row)
    has_ranking, has_ratings = row.get("ranking") is not None, row.get("ratings") is not None
    if has_ranking == has_ratings:
        raise InvalidInput("a listwise row needs exactly one of 'ranking' or 'ratings'")
    k = len(ids)
    if has_ranking:
        row_ranks, ratings = ranking_to_ranks(row["ranking"], k), None
    else:
        row_ranks, ratings = ratings_to_ranks(row["ratings"], k), row["ratings"]
    task_id, canonical = _task(ctx, TaskKind.listwise, prompt, ids)
    # The task may already exist with its completions in another order: map row -> canonical.
    position = {completion_id: i for i, completion_id in enumerate(ids)}
    ranks = [row_ranks[position[c]] for c in canonical]
    value: dict[str, Any] = {"ranks": ranks}
    if ratings is not None:
        value["ratings"] = [ratings[position[c]] for c in canonical]
    _label(ctx, row, task_id, value)


BINARY_VALUES: dict[Any, str] = {True: "up", False: "down", "up": "up", "down": "down"}


def _apply_binary(ctx: _Context, row: dict[str, Any]) -> None:
    prompt = _prompt(ctx, row)
    completion = _completion_id(ctx, prompt, _require(row, "completion"), "completion")
    label = _require(row, "label")
    if not isinstance(label, bool | str) or label not in BINARY_VALUES:
        raise InvalidInput("label must be true/false or 'up'/'down'")
    task_id, _ = _task(ctx, TaskKind.binary, prompt, [completion])
    _label(ctx, row, task_id, {"choice": BINARY_VALUES[label]})


def _apply_tasks(ctx: _Context, row: dict[str, Any]) -> None:
    kind_name = _require(row, "kind")
    if kind_name not in TaskKind.__members__:
        raise InvalidInput("kind must be one of pairwise, listwise, binary")
    overlap = row.get("overlap")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int)):
        raise InvalidInput("overlap must be an integer")
    prompt = _prompt(ctx, row)
    ids = _listwise_completions(ctx, prompt, row)
    gold = row.get("gold")
    _task(ctx, TaskKind(kind_name), prompt, ids, gold=gold, overlap=overlap)


APPLY: dict[str, Callable[[_Context, dict[str, Any]], None]] = {
    "prompts": _apply_prompts, "pairwise": _apply_pairwise, "listwise": _apply_listwise,
    "binary": _apply_binary, "tasks": _apply_tasks,
}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (line number, row or error) for each non-blank line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RowError(number, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                yield number, RowError(number, "a row must be a JSON object")
                continue
            yield number, row


def import_jsonl(
    db: Database,
    path: Path,
    *,
    format: ImportFormat,
    source: str = "import",
    annotator_kind: AnnotatorKind = AnnotatorKind.human,
    on_error: OnError = "fail",
    dataset: str | None = None,
    split: str | None = None,
    overlap: int = 1,
    on_row: Callable[[int], None] | None = None,
) -> ImportReport:
    """Apply a JSONL file to the store in one transaction; see the module docstring."""
    if format not in APPLY:
        raise InvalidInput(f"unknown import format {format!r}; use one of {', '.join(APPLY)}")
    if on_error not in ("fail", "skip"):
        raise InvalidInput("on_error must be 'fail' or 'skip'")
    if not source or len(source) > 200:
        raise InvalidInput("source must have 1 to 200 characters")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file")
    report = ImportReport(format=format)
    apply = APPLY[format]
    with db.write() as session:
        ctx = _Context(session=session, source=source, annotator_kind=AnnotatorKind(annotator_kind),
                       dataset=dataset, split=split, overlap=overlap, report=report)
        for number, row in read_jsonl(path):
            report.rows_read += 1
            if on_row is not None:
                on_row(number)
            if isinstance(row, RowError):
                report.errors.append(row)
                continue
            before = Counter(report.created)
            try:
                with session.begin_nested():
                    apply(ctx, row)
            except StoreError as exc:
                report.errors.append(RowError(number, str(exc)))
                report.created = before  # the savepoint undid what this row created
                # A rolled-back savepoint may have held an annotator created by this row.
                ctx.annotators = {n: a for n, a in ctx.annotators.items() if a in session}
                continue
            report.rows_written += 1
        if report.errors and on_error == "fail":
            report.rows_written = 0
            report.created = Counter()
            raise ImportRejected(report)
    report.committed = True
    return report
