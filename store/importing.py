"""Import JSONL files into the store: prompts, labelled pairwise/listwise/binary feedback, tasks.

    prefloop import data.jsonl --format pairwise --source ultrafeedback --on-error skip

The formats are in docs/formats.md. The whole file is applied in one write transaction: with
`on_error="fail"` a single bad row rolls everything back (and every bad row is still reported,
with its line number); with `on_error="skip"` the good rows are written and the bad ones listed.

Rows go in batches of `CHUNK_ROWS`: each row is read and checked on its own (store/import_rows.py:
bad bytes, JSON, shapes, values, who the annotator is), then the batch's good rows are written
together by store/bulk.py, with the get-or-create semantics and the audit rows of
store/repo.py's one-row functions. A bad row writes nothing, so skipping it leaves exactly what
the good rows make.

Who labels: a row's `annotator` (default: the source) is the import's own annotator. A new name
is created as an import identity (a human one has no role, so it can never sign in or be given
a token); a name that is a person's account (a human with an API token) or a judge configured
in the store (`prefloop judge ...`) is refused, so an import never writes in their name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from store.bulk import BulkWriter
from store.db import Database
from store.errors import InvalidInput, StoreError
from store.import_rows import (
    MAX_OVERLAP,
    AnnotatorBook,
    PlanContext,
    RowError,
    RowPlan,
    plan_binary,
    plan_listwise,
    plan_pairwise,
    plan_prompts,
    plan_tasks,
    read_jsonl,
    text_problem,
)
from store.models import AnnotatorKind

ImportFormat = Literal["prompts", "pairwise", "listwise", "binary", "tasks"]
IMPORT_FORMATS: tuple[str, ...] = ("prompts", "pairwise", "listwise", "binary", "tasks")
OnError = Literal["fail", "skip"]
# Rows per batch: large enough that statements are few, small enough that a batch's keys fit a
# handful of lookups and memory stays flat on files of any length.
CHUNK_ROWS = 2000

__all__ = ["IMPORT_FORMATS", "ImportRejected", "ImportReport", "RowError", "import_jsonl",
           "read_jsonl"]


@dataclass
class ImportReport:
    format: str
    rows_read: int = 0
    rows_written: int = 0
    errors: list[RowError] = field(default_factory=list)
    # What the rows created: prompts, completions, tasks, labels (what was stored already is
    # not counted again).
    created: Counter[str] = field(default_factory=Counter)
    committed: bool = False


class ImportRejected(StoreError):
    """Raised (and the transaction rolled back) when on_error='fail' and a row was bad."""

    status_code = 422

    def __init__(self, report: ImportReport):
        self.report = report
        super().__init__(f"{len(report.errors)} bad row(s); nothing was written")


PLAN: dict[str, Callable[[PlanContext, int, dict[str, Any]], RowPlan]] = {
    "prompts": plan_prompts, "pairwise": plan_pairwise, "listwise": plan_listwise,
    "binary": plan_binary, "tasks": plan_tasks,
}


def _check_arguments(format: str, on_error: str, source: str, path: Path, overlap: int,
                     dataset: str | None, split: str | None) -> None:
    if format not in PLAN:
        raise InvalidInput(f"unknown import format {format!r}; use one of {', '.join(PLAN)}")
    if on_error not in ("fail", "skip"):
        raise InvalidInput("on_error must be 'fail' or 'skip'")
    if not source or len(source) > 200:
        raise InvalidInput("source must have 1 to 200 characters")
    if isinstance(overlap, bool) or not isinstance(overlap, int) \
            or not 1 <= overlap <= MAX_OVERLAP:
        raise InvalidInput(f"overlap must be an integer from 1 to {MAX_OVERLAP}")
    # Command-line text can hold lone surrogates (undecodable bytes in argv).
    for what, text in (("source", source), ("dataset", dataset), ("split", split)):
        problem = text_problem(text) if text is not None else None
        if problem:
            raise InvalidInput(f"{what} {problem}")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file")


def _chunks(rows: Iterator[tuple[int, dict[str, Any] | RowError]], size: int
            ) -> Iterator[list[tuple[int, dict[str, Any] | RowError]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


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
    chunk_rows: int = CHUNK_ROWS,
) -> ImportReport:
    """Apply a JSONL file to the store in one transaction; see the module docstring."""
    _check_arguments(format, on_error, source, path, overlap, dataset, split)
    report = ImportReport(format=format)
    plan_row = PLAN[format]
    book = AnnotatorBook()
    ctx = PlanContext(source=source, annotator_kind=AnnotatorKind(annotator_kind),
                      dataset=dataset, split=split, overlap=overlap, book=book)
    with db.write() as session:
        writer = BulkWriter(session.connection(), source=source)
        for chunk in _chunks(read_jsonl(path), max(1, chunk_rows)):
            rows: list[tuple[int, dict[str, Any]]] = []
            for number, row in chunk:
                report.rows_read += 1
                if on_row is not None:
                    on_row(number)
                if isinstance(row, RowError):
                    report.errors.append(row)
                else:
                    rows.append((number, row))
            if format != "prompts" and format != "tasks":
                writer.load_annotators(book, (
                    name for _, row in rows
                    if isinstance(name := row.get("annotator") or source, str)))
            plans: list[RowPlan] = []
            for number, row in rows:
                try:
                    plan = plan_row(ctx, number, row)
                except StoreError as exc:
                    report.errors.append(RowError(number, str(exc)))
                    continue
                if plan.label is not None:  # a good row's new annotator exists from now on
                    book.adopt(plan.label.annotator, plan.label.annotator_kind)
                plans.append(plan)
            if plans:
                result = writer.write(plans, book)
                report.rows_written += result.written
                report.errors.extend(result.errors)
                report.created.update(result.created)
        report.errors.sort(key=lambda error: error.line)
        report.created = +report.created  # drop the zero counts
        if report.errors and on_error == "fail":
            report.rows_written = 0
            report.created = Counter()
            raise ImportRejected(report)
    report.committed = True
    return report
