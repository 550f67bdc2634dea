"""Numbers for the admin view and `GET /api/stats`: counts, throughput, gold accuracy, agreement.

Agreement is Krippendorff's alpha (Krippendorff, "Computing Krippendorff's Alpha-Reliability",
2011): it takes any number of annotators per task and missing labels, which Cohen's kappa (two
raters) and Fleiss' kappa (a fixed number of raters per item) do not. Pairwise and binary labels
use the nominal distance; listwise labels use the interval distance on each completion's rank.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from statistics import median

from sqlmodel import col, select

from app.schemas import Stats
from store import assignment
from store.db import Database
from store.models import Annotator, AnnotatorKind, Label, LabelStatus, Task, TaskKind
from store.queries import store_counts

Distance = Callable[[Hashable, Hashable], float]


def nominal(a: Hashable, b: Hashable) -> float:
    return 0.0 if a == b else 1.0


def interval(a: Hashable, b: Hashable) -> float:
    return (float(a) - float(b)) ** 2  # type: ignore[arg-type]


def krippendorff_alpha(units: Iterable[Sequence[Hashable]],
                       distance: Distance = nominal) -> float | None:
    """Alpha over units, each the list of values annotators gave it (missing ones left out).

    Units with fewer than two values carry no pairs and are ignored. None when there is no pair
    at all, or when every value is the same (expected disagreement 0: alpha is undefined).
    """
    coincidences: defaultdict[tuple[Hashable, Hashable], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, a in enumerate(values):
            for j, b in enumerate(values):
                if i != j:
                    coincidences[(a, b)] += 1.0 / (m - 1)
    totals: defaultdict[Hashable, float] = defaultdict(float)
    for (a, _b), weight in coincidences.items():
        totals[a] += weight
    n = sum(totals.values())
    if n <= 1:
        return None
    observed = sum(w * distance(a, b) for (a, b), w in coincidences.items()) / n
    values = list(totals)
    expected = sum(totals[a] * totals[b] * distance(a, b) for a in values for b in values)
    expected /= n * (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def agreement_by_kind(rows: Sequence[tuple[Label, Task]]) -> dict[str, dict[str, object]]:
    by_task: dict[int, list[Label]] = defaultdict(list)
    kinds: dict[int, TaskKind] = {}
    for label, task in rows:
        by_task[label.task_id].append(label)
        kinds[label.task_id] = task.kind
    out: dict[str, dict[str, object]] = {}
    for kind in TaskKind:
        tasks = [labels for task_id, labels in by_task.items() if kinds[task_id] == kind]
        multi = [labels for labels in tasks if len(labels) >= 2]
        if kind == TaskKind.listwise:
            units: list[list[Hashable]] = []
            for labels in multi:
                k = len(labels[0].ranks or [])
                units += [[lab.ranks[p] for lab in labels if lab.ranks] for p in range(k)]
            alpha = krippendorff_alpha(units, interval)
            metric = "krippendorff_alpha_interval_on_ranks"
        else:
            alpha = krippendorff_alpha([[lab.choice for lab in labels] for labels in multi])
            metric = "krippendorff_alpha_nominal"
        out[kind.value] = {"metric": metric, "alpha": alpha, "tasks_with_2plus": len(multi),
                           "labels": sum(len(labels) for labels in multi)}
    return out


def project_stats(db: Database) -> Stats:
    with db.read() as session:
        counts = store_counts(session)
        rows = session.exec(
            select(Label, Task, Annotator)
            .join(Task, col(Task.id) == col(Label.task_id))
            .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(Label.status == LabelStatus.submitted)
        ).all()
        gold = assignment.gold_accuracy(session=session)
        people = session.exec(select(Annotator).where(
            Annotator.kind == AnnotatorKind.human).order_by(col(Annotator.id))).all()

    by_source: Counter[str] = Counter()
    times: dict[int, list[datetime]] = defaultdict(list)
    per_hour: Counter[tuple[str, str]] = Counter()
    human_rows = []
    now = datetime.now(UTC)
    for label, task, annotator in rows:
        by_source[annotator.kind.value] += 1
        by_source[f"task_source:{task.source or 'none'}"] += 1
        created = _aware(label.created_at)
        times[label.annotator_id].append(created)
        hour = created.replace(minute=0, second=0, microsecond=0).isoformat()
        per_hour[(hour, annotator.kind.value)] += 1
        if annotator.kind == AnnotatorKind.human:
            human_rows.append((label, task))

    annotators: list[dict[str, object]] = []
    for person in people:
        assert person.id is not None
        stamps = sorted(times.get(person.id, []))
        gaps = [(b - a).total_seconds() for a, b in pairwise(stamps)]
        correct, answered = gold.get(person.id, (0, 0))
        annotators.append({
            "annotator_id": person.id, "name": person.name,
            "role": person.role.value if person.role else None, "active": person.active,
            "labels": len(stamps),
            "labels_last_hour": sum(1 for t in stamps if (now - t).total_seconds() <= 3600),
            "median_seconds_between_labels": median(gaps) if gaps else None,
            "gold_answered": answered, "gold_correct": correct,
            "gold_accuracy": correct / answered if answered else None,
        })
    return Stats(
        counts=counts, labels_by_source=dict(sorted(by_source.items())),
        annotators=annotators, agreement=agreement_by_kind(human_rows),
        labels_per_hour=[{"hour": hour, "source": source, "labels": n}
                         for (hour, source), n in sorted(per_hour.items())],
    )
