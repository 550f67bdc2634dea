"""Calibrate a judge against humans, and route uncertain tasks to the human queue.

    prefloop judge calibrate --judge judges/pairwise.toml
    prefloop judge route --judge judges/a.toml --judge judges/b.toml --min-confidence 0.6

On the tasks a judge labelled that also carry gold answers or human labels, calibration reports
agreement with the gold answer or the human majority, Cohen's kappa, the invalid rate, and the
judge's own bias figures (position consistency, first-position win rate, longer-response win
rate; for reference, GPT-4 pairwise judgments in FastChat#3911 had the first-shown answer win
52.6% and the longer one 68.0%, and flipped 12.9% of verdicts on swap).
The result is stored per judge identity (model + rubric version) in `judge_calibration`.
The metrics are pure functions of `CalibrationItem`s, tested on hand-computed values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sqlmodel import col, select

from feedback.config import JudgeConfig
from store.calibration import (
    CalibrationItem,
    calibration_items,
    judge_disagreements,
    latest_agreements,
    raise_task_priority,
    record_calibration,
)
from store.db import Database
from store.errors import NotFound
from store.exporting import majority, pair_votes
from store.models import Annotator, Label, LabelStatus, TaskKind
from store.values import pair_preference

# ---------------------------------------------------------------------------------------------
# Pure metrics


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over (rater 1, rater 2) category pairs.

    kappa = (p_o - p_e) / (1 - p_e), p_e from each rater's marginal category shares. None when
    undefined (no items, or both raters always use one and the same category).
    """
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in first) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def _relation(ranks: Sequence[int], i: int, j: int) -> str:
    winner = pair_preference(ranks, i, j)
    return "tie" if winner is None else ("i" if winner == i else "j")


def reference_verdicts(item: CalibrationItem) -> list[tuple[str, str]] | None:
    """(item key, reference verdict) for a task: gold first, else the human majority.

    Pairwise and binary tasks give one verdict; a listwise task gives one per position pair
    (i, j) ("i", "j" or "tie"), so rankings are compared pair by pair. None when there is no
    reference (no gold, no human label, or humans without a majority).
    """
    if item.kind == TaskKind.listwise:
        if item.gold and item.gold.get("ranks"):
            ranks = item.gold["ranks"]
            return [(f"{i},{j}", _relation(ranks, i, j))
                    for i, j in combinations(range(len(ranks)), 2)]
        if not item.human_ranks:
            return None
        k = len(item.human_ranks[0])
        out = []
        for i, j in combinations(range(k), 2):
            winner, _ = majority(pair_votes(item.human_ranks, i, j))
            if winner is not None:
                out.append((f"{i},{j}", winner))
        return out or None
    if item.gold and item.gold.get("choice"):
        return [("choice", item.gold["choice"])]
    winner, _ = majority(item.human_choices)
    return None if winner is None else [("choice", winner)]


def judge_verdicts(item: CalibrationItem) -> dict[str, str] | None:
    if item.judge_status != LabelStatus.submitted:
        return None
    if item.kind == TaskKind.listwise:
        ranks = item.judge_ranks or []
        return {f"{i},{j}": _relation(ranks, i, j) for i, j in combinations(range(len(ranks)), 2)}
    return {"choice": item.judge_choice or ""}


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def calibration_metrics(items: Sequence[CalibrationItem]) -> tuple[int, dict[str, Any]]:
    """(number of tasks with a reference, metrics) for one judge's labels."""
    compared: list[tuple[str, str]] = []
    by_kind: dict[str, list[tuple[str, str]]] = {}
    n_reference = invalid_on_reference = 0
    for item in items:
        reference = reference_verdicts(item)
        if reference is None:
            continue
        n_reference += 1
        verdicts = judge_verdicts(item)
        if verdicts is None:
            invalid_on_reference += 1
            continue
        for key, ref in reference:
            pair = (verdicts[key], ref)
            compared.append(pair)
            by_kind.setdefault(item.kind.value, []).append(pair)

    # Bias figures need no human labels: computed over every task the judge labelled.
    consistent = two_order = first_wins = decisive_orders = 0
    longer_wins = decisive_with_lengths = human_longer = human_decisive = 0
    for item in items:
        if item.kind != TaskKind.pairwise:
            continue
        orders = (item.judge_details or {}).get("orders") or []
        if len(orders) == 2 and all(o.get("valid") for o in orders):
            two_order += 1
            consistent += bool((item.judge_details or {}).get("consistent"))
        for order in orders:
            if order.get("valid") and order.get("choice") in ("a", "b"):
                decisive_orders += 1
                first_wins += order["choice"] == "a"  # "a" = the response shown first
        lengths = item.response_lengths
        if len(lengths) == 2 and lengths[0] != lengths[1]:
            longer = "a" if lengths[0] > lengths[1] else "b"
            if item.judge_status == LabelStatus.submitted and item.judge_choice in ("a", "b"):
                decisive_with_lengths += 1
                longer_wins += item.judge_choice == longer
            for choice in item.human_choices:
                if choice in ("a", "b"):
                    human_decisive += 1
                    human_longer += choice == longer
    n_invalid = sum(item.judge_status == LabelStatus.invalid for item in items)
    decisive = [(a, b) for a, b in compared if b not in ("tie", "both_bad")]
    metrics: dict[str, Any] = {
        "agreement": _rate(sum(a == b for a, b in compared), len(compared)),
        # On the references that pick a side (a judge that never says tie is scored fairly).
        "agreement_decisive": _rate(sum(a == b for a, b in decisive), len(decisive)),
        "n_decisive": len(decisive),
        "cohen_kappa": cohen_kappa(compared),
        "n_compared": len(compared),
        "invalid_rate": _rate(invalid_on_reference, n_reference),
        "position_consistency": _rate(consistent, two_order),
        "first_position_win_rate": _rate(first_wins, decisive_orders),
        "longer_response_win_rate": _rate(longer_wins, decisive_with_lengths),
        "human_longer_response_win_rate": _rate(human_longer, human_decisive),
        "n_judged": len(items),
        "invalid_rate_all": _rate(n_invalid, len(items)),
        "by_kind": {kind: {"agreement": _rate(sum(a == b for a, b in pairs), len(pairs)),
                           "cohen_kappa": cohen_kappa(pairs), "n_compared": len(pairs)}
                    for kind, pairs in sorted(by_kind.items())},
    }
    return n_reference, metrics


# ---------------------------------------------------------------------------------------------
# Store-facing shell


@dataclass(frozen=True)
class CalibrationResult:
    annotator_id: int
    annotator_name: str
    n_tasks: int
    metrics: dict[str, Any]
    calibration_id: int


def _annotator(session: Any, name: str) -> Annotator:
    annotator = session.exec(select(Annotator).where(Annotator.name == name)).first()
    if annotator is None:
        raise NotFound(f"judge {name!r} has no labels yet: run `prefloop judge run` first")
    return annotator


def calibrate(db: Database, config: JudgeConfig, *, against: str | None = None
              ) -> CalibrationResult:
    """Measure the judge against gold/human labels, or against the labels of the judge named
    `against` (its annotator name) on the same tasks, and store the result."""
    with db.read() as session:
        annotator = _annotator(session, config.annotator_name)
        reference = _annotator(session, against) if against is not None else None
        items = calibration_items(session=session, annotator_id=annotator.id or 0,
                                  reference_annotator_id=None if reference is None
                                  else reference.id or 0)
    n_tasks, metrics = calibration_metrics(items)
    metrics["reference"] = against or "gold and human labels"
    with db.write() as session:
        row = record_calibration(session=session, annotator_id=annotator.id or 0,
                                 n_tasks=n_tasks, metrics=metrics)
        row_id = row.id or 0
    return CalibrationResult(annotator.id or 0, annotator.name, n_tasks, metrics, row_id)


def route_tasks(db: Database, configs: Sequence[JudgeConfig], *, min_confidence: float,
                priority: int, task_ids: Sequence[int] | None = None,
                extra_annotators: Sequence[str] = ()) -> dict[str, int]:
    """Raise the priority of tasks humans should see first.

    A task is routed when the given judges disagree on it, or when one of their labels is
    uncertain: its confidence times the judge's calibrated agreement (when calibrated) is below
    `min_confidence`, or the judge flagged it for humans (inconsistent orders, injection flags).
    Tasks that already have a human label are left alone. `task_ids` limits it to those tasks
    (a round's); `extra_annotators` (names) take part in the disagreement check only, e.g. the
    rule judge an AI judge was calibrated against.
    """
    with db.read() as session:
        annotators = [_annotator(session, c.annotator_name) for c in configs]
        ids = [a.id or 0 for a in annotators]
        others = [_annotator(session, name).id or 0 for name in extra_annotators]
        agreements = latest_agreements(session=session)
        disagree = set(judge_disagreements(session=session, annotator_ids=ids + others,
                                           task_ids=task_ids))
        uncertain: set[int] = set()
        query = select(Label).where(col(Label.annotator_id).in_(ids))
        if task_ids is not None:
            query = query.where(col(Label.task_id).in_(list(task_ids)))
        for label in session.exec(query).all():
            details = label.details or {}
            if details.get("routed"):
                uncertain.add(label.task_id)
            elif label.status == LabelStatus.submitted and label.confidence is not None:
                weight = agreements.get(label.annotator_id)
                effective = label.confidence * (weight if weight is not None else 1.0)
                if effective < min_confidence:
                    uncertain.add(label.task_id)
        human_labelled = set(session.exec(
            select(Label.task_id).join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(Annotator.kind == "human")).all())
    routed = (disagree | uncertain) - human_labelled
    with db.write() as session:
        changed = raise_task_priority(session=session, task_ids=routed, priority=priority)
    return {"disagreement": len(disagree - human_labelled),
            "low_confidence": len(uncertain - human_labelled), "routed": len(routed),
            "priority_raised": changed}
