"""Export the store's labels as training files (TRL's dataset formats) with a manifest.

    prefloop export --format trl-preference --out prefs.jsonl --source human --min-agreement 0.6

Formats, aggregation and the manifest are described in docs/formats.md. In short: several labels
on one task are reduced to their majority with an agreement figure; a listwise ranking of K
completions becomes its C(K,2) ordered pairs, each weighted 1/C(K,2) as in the InstructGPT reward
model recipe (Ouyang et al. 2022, Sec. 3.5: each prompt's comparisons are one batch element, so
heavily-ranked prompts do not dominate); ties and both-bad give no pair. Rows come out in a fixed
order, so the same store content always gives the same bytes and the same sha256.

`prefloop export` (`export_jsonl`) and a round's dataset stage (loop/stages/dataset.py) write
through the same three steps: `render_export` (rows to bytes), `write_export` (the file and its
manifest, by rename) and `record_snapshot` (the `export_snapshot` row); the export records the
row first and names it in the manifest, the round writes the files first and the row with its
stage's advance.

Every file has one shape, all plain text or all conversational (store/export_shape.py: TRL's
trainers crash on a mix). Tasks are read in chunks of `LOAD_CHUNK` inside the one read
transaction, which bounds the bind parameters per query and lets `on_progress` report
("reading", tasks done, tasks total) and then ("writing", rows done, rows total).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session, col, func, select

from store import repo
from store.calibration import label_weight, latest_agreements
from store.db import Database
from store.errors import InvalidInput
from store.export_shape import ExportShape, check_shape, shape_rows
from store.models import (
    Annotator,
    AnnotatorKind,
    Completion,
    ExportSnapshot,
    Label,
    LabelStatus,
    Prompt,
    Task,
    TaskItem,
    TaskKind,
)
from store.values import content_text, pair_preference, sha256_hex

ExportFormat = Literal["trl-preference", "trl-unpaired", "sft", "listwise"]
EXPORT_FORMATS: tuple[str, ...] = ("trl-preference", "trl-unpaired", "sft", "listwise")
SOURCES = ("human", "ai", "rule", "all")

# Tasks per chunk of queries: the item and label queries bind one parameter per task id, and
# psycopg 3 binds server-side, where PostgreSQL allows at most 65535 parameters per statement.
LOAD_CHUNK = 1000
# How often (in rows) rendering reports progress.
PROGRESS_EVERY = 1000

# on_progress(phase, done, total): phase "reading" counts tasks, "writing" counts rows.
ProgressCallback = Callable[[str, int, int], None]

KINDS_FOR_FORMAT: dict[str, tuple[TaskKind, ...]] = {
    "trl-preference": (TaskKind.pairwise, TaskKind.listwise),
    "trl-unpaired": (TaskKind.binary,),
    "sft": (TaskKind.pairwise, TaskKind.listwise, TaskKind.binary),
    "listwise": (TaskKind.listwise,),
}


@dataclass(frozen=True)
class ExportFilters:
    """Which labels an export reads and which rows it keeps."""

    sources: tuple[str, ...] = ("all",)
    min_agreement: float = 0.0
    dataset: str | None = None
    split: str | None = None
    round_id: int | None = None
    # trl-unpaired: also turn each preference pair into a desirable + an undesirable row (KTO).
    pairs_as_unpaired: bool = False
    # Drop AI/rule labels whose judge agrees with humans less than this (judge calibration);
    # a judge never calibrated counts as 0. Human labels are never dropped by it.
    min_judge_agreement: float = 0.0
    # Weighted majority: a human label weighs 1, an AI/rule label its judge's agreement.
    weight_ai_by_agreement: bool = False
    # One shape per file: "auto" | "text" | "chat" (store/export_shape.py).
    shape: ExportShape = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if not self.sources or unknown:
            raise InvalidInput(f"source must be among {', '.join(SOURCES)}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise InvalidInput("min_agreement must be between 0 and 1")
        if not 0.0 <= self.min_judge_agreement <= 1.0:
            raise InvalidInput("min_judge_agreement must be between 0 and 1")
        check_shape(self.shape)

    def uses_calibration(self) -> bool:
        return self.min_judge_agreement > 0 or self.weight_ai_by_agreement

    def annotator_kinds(self) -> set[AnnotatorKind]:
        if "all" in self.sources:
            return set(AnnotatorKind)
        return {AnnotatorKind(s) for s in self.sources}


# ---------------------------------------------------------------------------------------------
# Aggregation: pure functions


def majority(votes: Sequence[str], weights: Sequence[float] | None = None
             ) -> tuple[str | None, float]:
    """The vote with the most (weighted) support and the share of the weight behind it.

    A tie at the top has no majority: (None, top share).
    """
    if not votes:
        return None, 0.0
    totals: dict[str, float] = defaultdict(float)
    for vote, weight in zip(votes, weights or [1.0] * len(votes), strict=True):
        totals[vote] += weight
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    total, top = sum(totals.values()), ranked[0][1]
    if len(ranked) > 1 and abs(ranked[1][1] - top) <= 1e-12 * max(1.0, top):
        return None, top / total
    return ranked[0][0], top / total


def aggregate_ranks(rankings: Sequence[Sequence[int]],
                    weights: Sequence[float] | None = None) -> list[int]:
    """Dense ranks of the (weighted) mean rank per position (Borda-style); equal means tie."""
    weights = weights or [1.0] * len(rankings)
    k, total = len(rankings[0]), sum(weights)
    means = [round(sum(w * r[i] for r, w in zip(rankings, weights, strict=True)) / total, 9)
             for i in range(k)]
    distinct = sorted(set(means))
    return [distinct.index(m) + 1 for m in means]


def pair_votes(rankings: Sequence[Sequence[int]], i: int, j: int) -> list[str]:
    """Each ranking's verdict on positions (i, j): 'i', 'j' or 'tie'."""
    votes = []
    for ranks in rankings:
        winner = pair_preference(ranks, i, j)
        votes.append("tie" if winner is None else ("i" if winner == i else "j"))
    return votes


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class _TaskData:
    task: Task
    prompt: Prompt
    completions: list[Completion]  # canonical order
    labels: list[Label] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # one per label

    def choices(self) -> list[str]:
        return [label.choice or "" for label in self.labels]

    def rankings(self) -> list[list[int]]:
        return [label.ranks or [] for label in self.labels]


def _task_query(kinds: Sequence[TaskKind], filters: ExportFilters) -> Any:
    query = (
        select(Task, Prompt)
        .join(Prompt, col(Prompt.id) == col(Task.prompt_id))
        .where(col(Task.kind).in_(list(kinds)))
    )
    if filters.dataset is not None:
        query = query.where(Prompt.dataset == filters.dataset)
    if filters.split is not None:
        query = query.where(Prompt.split == filters.split)
    if filters.round_id is not None:
        query = query.where(Task.round_id == filters.round_id)
    return query


def _load(session: Session, kinds: Sequence[TaskKind], filters: ExportFilters,
          counts: Counter[str], judge_agreements: dict[str, float | None],
          on_progress: ProgressCallback | None = None) -> Iterator[_TaskData]:
    """The labelled tasks in id order, read `LOAD_CHUNK` tasks at a time."""
    query = _task_query(kinds, filters)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    agreements = latest_agreements(session=session) if filters.uses_calibration() else {}
    done, last_id = 0, 0
    while chunk := session.exec(query.where(col(Task.id) > last_id).order_by(col(Task.id))
                                .limit(LOAD_CHUNK)).all():
        tasks = {task.id: _TaskData(task, prompt, []) for task, prompt in chunk}
        ids = list(tasks)
        last_id = ids[-1]
        _attach(session, tasks, ids, filters, agreements, counts, judge_agreements)
        done += len(chunk)
        if on_progress is not None:
            on_progress("reading", done, total)
        yield from (data for data in tasks.values() if data.labels)


def _attach(session: Session, tasks: dict[int | None, _TaskData], ids: list[int | None],
            filters: ExportFilters, agreements: dict[int, float | None], counts: Counter[str],
            judge_agreements: dict[str, float | None]) -> None:
    """Fill one chunk's tasks with their completions (canonical order) and kept labels."""
    items = session.exec(
        select(TaskItem, Completion)
        .join(Completion, col(Completion.id) == col(TaskItem.completion_id))
        .where(col(TaskItem.task_id).in_(ids))
        .order_by(col(TaskItem.task_id), col(TaskItem.position))
    ).all()
    for item, completion in items:
        tasks[item.task_id].completions.append(completion)
    labels = session.exec(
        select(Label, Annotator.kind)
        .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
        .where(
            col(Label.task_id).in_(ids),
            Label.status == LabelStatus.submitted,
            col(Annotator.kind).in_(list(filters.annotator_kinds())),
        )
        .order_by(col(Label.task_id), col(Label.id))
    ).all()
    for label, kind in labels:
        weight = 1.0
        if filters.uses_calibration():
            weight = label_weight(AnnotatorKind(kind), label.annotator_id, agreements,
                                  min_agreement=filters.min_judge_agreement)
            if weight == 0.0:
                counts["labels_dropped_judge_agreement"] += 1
                continue
            if not filters.weight_ai_by_agreement:
                weight = 1.0
            if kind != AnnotatorKind.human:
                judge_agreements[str(label.annotator_id)] = agreements[label.annotator_id]
        tasks[label.task_id].labels.append(label)
        tasks[label.task_id].weights.append(weight)


def _as_completion(prompt: Any, completion: Any) -> Any:
    """TRL wants completions of the same type as the prompt (text, or a list of messages)."""
    if isinstance(prompt, list):
        if isinstance(completion, str):
            return [{"role": "assistant", "content": completion}]
        return completion
    return content_text(completion)


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class _Pair:
    data: _TaskData
    chosen: int  # canonical positions
    rejected: int
    weight: float
    agreement: float


def _pairs(data: _TaskData, counts: Counter[str]) -> list[_Pair]:
    """The preference pairs a task yields after aggregation (see module docstring)."""
    if data.task.kind == TaskKind.pairwise:
        winner, agreement = majority(data.choices(), data.weights)
        if winner is None:
            counts["skipped_no_majority"] += 1
            return []
        if winner in ("tie", "both_bad"):
            counts[f"skipped_{winner}"] += 1
            return []
        chosen = 0 if winner == "a" else 1
        return [_Pair(data, chosen, 1 - chosen, 1.0, agreement)]
    # listwise
    rankings = data.rankings()
    k = len(data.completions)
    weight = 1.0 / comb(k, 2)
    pairs = []
    for i, j in combinations(range(k), 2):
        winner, agreement = majority(pair_votes(rankings, i, j), data.weights)
        if winner is None:
            counts["skipped_no_majority"] += 1
        elif winner == "tie":
            counts["skipped_tie"] += 1
        else:
            chosen, rejected = (i, j) if winner == "i" else (j, i)
            pairs.append(_Pair(data, chosen, rejected, weight, agreement))
    return pairs


def _base(data: _TaskData) -> dict[str, Any]:
    return {"task_id": data.task.id, "task_kind": data.task.kind.value,
            "n_labels": len(data.labels)}


@dataclass
class BuiltExport:
    rows: list[dict[str, Any]]
    counts: Counter[str]
    # judge annotator id -> the calibrated agreement used to weight or filter its labels
    judge_agreements: dict[str, float | None]
    shape: str = "text"  # the shape every row has: "text" or "chat"


def build_rows(session: Session, format: ExportFormat, filters: ExportFilters,
               on_progress: ProgressCallback | None = None) -> BuiltExport:
    """The export's rows, in order and in one shape, counts of what was kept and skipped,
    judge weights used."""
    if format not in KINDS_FOR_FORMAT:
        raise InvalidInput(f"unknown export format {format!r}; use one of "
                           f"{', '.join(EXPORT_FORMATS)}")
    kinds = KINDS_FOR_FORMAT[format]
    if format == "trl-unpaired" and filters.pairs_as_unpaired:
        kinds = (TaskKind.pairwise, TaskKind.listwise, TaskKind.binary)
    counts: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    judge_agreements: dict[str, float | None] = {}

    def keep(agreement: float) -> bool:
        if agreement + 1e-12 < filters.min_agreement:
            counts["skipped_low_agreement"] += 1
            return False
        return True

    for data in _load(session, kinds, filters, counts, judge_agreements, on_progress):
        counts[f"tasks_{data.task.kind.value}"] += 1
        counts["labels_used"] += len(data.labels)
        prompt = data.prompt.content
        completion = [_as_completion(prompt, c.content) for c in data.completions]
        if data.task.kind == TaskKind.binary:
            winner, agreement = majority(data.choices(), data.weights)
            if winner is None:
                counts["skipped_no_majority"] += 1
                continue
            if not keep(agreement):
                continue
            if format == "trl-unpaired":
                rows.append({"prompt": prompt, "completion": completion[0],
                             "label": winner == "up", "weight": 1.0,
                             "agreement": agreement, **_base(data)})
            elif winner == "up":  # sft
                rows.append({"prompt": prompt, "completion": completion[0], **_base(data)})
            continue
        if format == "listwise":
            rankings = data.rankings()
            ranks = aggregate_ranks(rankings, data.weights)
            k = len(ranks)
            pair_agreement = [majority(pair_votes(rankings, i, j), data.weights)[1]
                              for i, j in combinations(range(k), 2)]
            agreement = sum(pair_agreement) / len(pair_agreement)
            if keep(agreement):
                rows.append({"prompt": prompt, "completions": completion, "ranks": ranks,
                             "agreement": agreement, **_base(data)})
            continue
        if format == "sft":
            # The winner of a pairwise task; the aggregated best of a listwise one.
            if data.task.kind == TaskKind.pairwise:
                winner, agreement = majority(data.choices(), data.weights)
                best = {"a": [0], "b": [1]}.get(winner or "", [])
                if not best:
                    counts["skipped_no_winner"] += 1
                    continue
            else:
                rankings = data.rankings()
                ranks = aggregate_ranks(rankings, data.weights)
                best = [i for i, r in enumerate(ranks) if r == 1]
                # The (weighted) share of rankings that put every aggregated-best completion first.
                agreeing = sum(w for r, w in zip(rankings, data.weights, strict=True)
                               if all(r[i] == 1 for i in best))
                agreement = agreeing / sum(data.weights)
            if keep(agreement):
                rows.extend({"prompt": prompt, "completion": completion[i], **_base(data)}
                            for i in best)
            continue
        for pair in _pairs(data, counts):
            if not keep(pair.agreement):
                continue
            if format == "trl-preference":
                rows.append({"prompt": prompt, "chosen": completion[pair.chosen],
                             "rejected": completion[pair.rejected], "weight": pair.weight,
                             "agreement": pair.agreement, **_base(data)})
            else:  # trl-unpaired with pairs_as_unpaired
                for position, desirable in ((pair.chosen, True), (pair.rejected, False)):
                    rows.append({"prompt": prompt, "completion": completion[position],
                                 "label": desirable, "weight": pair.weight,
                                 "agreement": pair.agreement, **_base(data)})
    rows, shape = shape_rows(rows, filters.shape, counts)
    counts["rows"] = len(rows)
    return BuiltExport(rows, counts, dict(sorted(judge_agreements.items())), shape)


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest_path: Path
    sha256: str
    rows: int
    counts: dict[str, int]
    snapshot_id: int
    shape: str = "text"


@dataclass(frozen=True)
class RenderedExport:
    """An export as bytes, with what its manifest and its snapshot row record."""

    format: str
    payload: bytes
    sha256: str
    rows: int
    counts: dict[str, int]
    filters: dict[str, Any]
    judge_agreements: dict[str, float | None]
    round_id: int | None
    shape: str = "text"


def manifest_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _write_atomically(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_export(db: Database, format: ExportFormat, filters: ExportFilters,
                  on_progress: ProgressCallback | None = None) -> RenderedExport:
    """The export's rows read in one consistent view and rendered as JSONL bytes (sorted keys,
    so the same store content always gives the same bytes and sha256)."""
    with db.read() as session:
        if not db.is_sqlite:
            # One consistent view across the several queries, as SQLite's read transaction is.
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        built = build_rows(session, format, filters, on_progress)
    lines, total = [], len(built.rows)
    for done, row in enumerate(built.rows, 1):
        lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        if on_progress is not None and (done % PROGRESS_EVERY == 0 or done == total):
            on_progress("writing", done, total)
    payload = "".join(lines).encode("utf-8")
    return RenderedExport(
        format=format, payload=payload, sha256=sha256_hex(payload), rows=len(built.rows),
        counts=dict(sorted(built.counts.items())),
        filters={**asdict(filters), "sources": list(filters.sources)},
        judge_agreements=built.judge_agreements, round_id=filters.round_id,
        shape=built.shape)


def record_snapshot(session: Session, export: RenderedExport, out: Path) -> ExportSnapshot:
    """The export's `export_snapshot` row (in the caller's transaction)."""
    return repo.record_export(session=session, sha256=export.sha256, format=export.format,
                              path=str(out.resolve()), filters=export.filters,
                              counts=export.counts, rows=export.rows)


def write_export(export: RenderedExport, out: Path, *, database: str,
                 snapshot_id: int | None) -> Path:
    """Write the export file, then its manifest (the one manifest format), each by rename;
    returns the manifest's path. `snapshot_id` is None when the snapshot row is written after
    the files (a round records it with the stage's advance)."""
    from store import __version__

    _write_atomically(out, export.payload)
    manifest = {
        "sha256": export.sha256, "format": export.format, "shape": export.shape,
        "filters": export.filters,
        "counts": export.counts, "rows": export.rows, "round_id": export.round_id,
        "created_at": datetime.now(UTC).isoformat(), "prefloop_version": __version__,
        "snapshot_id": snapshot_id, "database": database,
        "judge_agreements": export.judge_agreements,
    }
    manifest_path = manifest_path_for(out)
    _write_atomically(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest_path


def export_prompts(out: Path, prompts: Sequence[Prompt]) -> str:
    """Prompts as the online trainers read them ({"prompt", "answer", "id"} per line), written
    by rename; returns the file's sha256."""
    payload = "".join(
        json.dumps({"prompt": p.content, "answer": p.reference or "", "id": str(p.id)},
                   ensure_ascii=False) + "\n" for p in prompts).encode()
    _write_atomically(out, payload)
    return sha256_hex(payload)


def export_jsonl(
    db: Database, *, format: ExportFormat, out: Path, filters: ExportFilters | None = None,
    on_progress: ProgressCallback | None = None,
) -> ExportResult:
    """Write the export and its manifest, and record the snapshot in the store."""
    export = render_export(db, format, filters or ExportFilters(), on_progress)
    with db.write() as session:
        snapshot_id = record_snapshot(session, export, out).id or 0
    manifest_path = write_export(export, out, database=db.url, snapshot_id=snapshot_id)
    return ExportResult(out, manifest_path, export.sha256, export.rows, export.counts,
                        snapshot_id, export.shape)
