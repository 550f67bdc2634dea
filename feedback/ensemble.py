"""Ensembles: several judges on the same tasks, combined by majority or weighted vote.

    prefloop judge run --judge judges/ensemble.toml     # kind = "ensemble", members = [...]

Each member runs first as an ordinary judge (feedback.batch.run_judge: idempotent, under its own
identity); `combine_ensemble` then reads the members' stored labels and stores one combined
label per task under the ensemble's identity, through the same judge-label writer as the batch
runner (store/judge_labels.py). Only tasks every member has dealt with are combined, so a rerun
after an interrupted member run fills the rest. The vote is a pure function (`vote`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from sqlmodel import Session, col, select

from feedback.config import EnsembleConfig, LLMJudgeConfig
from feedback.judge import Decision
from feedback.progress import RunStats
from store import repo
from store.db import Database
from store.judge_labels import JudgeLabel, record_judge_labels
from store.models import Annotator, AnnotatorKind, Label, LabelStatus, Task


def vote(kind: str, ballots: Sequence[tuple[dict[str, Any] | None, float]]) -> Decision:
    """Combine member labels (canonical value or None if invalid, weight) into one decision.

    pairwise/binary: the choice with the most weight wins; a tie at the top has no winner
    (invalid, routed to humans). Confidence = the winner's share of the valid weight.
    listwise: weighted mean rank per position -> dense ranks; confidence = the weighted share
    of members that order each position pair as the result does, averaged over pairs.
    """
    valid = [(value, weight) for value, weight in ballots if value is not None]
    details: dict[str, Any] = {"ballots": [{"value": v, "weight": w} for v, w in ballots]}
    if not valid:
        return Decision(None, None, None, {**details, "reason": "no_valid_member"})
    total = sum(w for _, w in valid)
    if kind == "listwise":
        k = len(valid[0][0]["ranks"])
        means = [sum(v["ranks"][i] * w for v, w in valid) / total for i in range(k)]
        distinct = sorted(set(means))
        ranks = [distinct.index(m) + 1 for m in means]

        def rel(r: Sequence[int], i: int, j: int) -> int:
            return (r[i] > r[j]) - (r[i] < r[j])

        shares = [sum(w for v, w in valid if rel(v["ranks"], i, j) == rel(ranks, i, j))
                  / total for i, j in combinations(range(k), 2)]
        confidence = sum(shares) / len(shares)
        return Decision({"ranks": ranks}, confidence, None, details,
                        route=confidence < 1.0 and len(valid) > 1)
    weights: dict[str, float] = defaultdict(float)
    for value, weight in valid:
        weights[value["choice"]] += weight
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and abs(ranked[0][1] - ranked[1][1]) < 1e-12:
        return Decision(None, None, None, {**details, "reason": "no_majority"}, route=True)
    choice, weight = ranked[0]
    return Decision({"choice": choice}, weight / total, None, details,
                    route=len(ranked) > 1)


def _member_labels(session: Session, member_ids: Sequence[int], ensemble_id: int
                   ) -> dict[int, dict[int, Label]]:
    """task -> member annotator -> label, for tasks the ensemble has not labelled yet."""
    done = select(Label.task_id).where(Label.annotator_id == ensemble_id)
    labels = session.exec(
        select(Label).where(col(Label.annotator_id).in_(list(member_ids)),
                            col(Label.task_id).not_in(done)).order_by(col(Label.task_id))
    ).all()
    out: dict[int, dict[int, Label]] = defaultdict(dict)
    for label in labels:
        out[label.task_id][label.annotator_id] = label
    return out


async def combine_ensemble(db: Database, config: EnsembleConfig,
                           member_stats: Sequence[RunStats]) -> RunStats:
    """Store the combined labels of the members' runs; the ensemble's RunStats (requests and
    spend are the members')."""

    def combine(session: Session) -> RunStats:
        stats = RunStats()  # built inside: run_write may re-run this from scratch
        kind = (AnnotatorKind.ai if any(isinstance(m, LLMJudgeConfig) for m in config.members)
                else AnnotatorKind.rule)
        ensemble = repo.get_or_create_annotator(
            session=session, name=config.annotator_name, kind=kind,
            rubric_version=config.rubric_version, config=config.identity())
        ensemble_id = ensemble.id or 0
        stats.annotator_id, stats.annotator_name = ensemble_id, ensemble.name
        members = {m.annotator_name: w for m, w in zip(config.members, config.weights,
                                                       strict=True)}
        rows = session.exec(select(Annotator).where(col(Annotator.name).in_(list(members))))
        weight_of = {a.id or 0: (members[a.name] if config.method == "weighted" else 1.0)
                     for a in rows}
        labels = []
        for task_id, by_member in _member_labels(session, list(weight_of), ensemble_id).items():
            if len(by_member) < len(weight_of):
                continue  # a member has not dealt with this task yet
            task = session.get(Task, task_id)
            assert task is not None
            ballots = [((({"choice": lb.choice} if lb.choice is not None else
                          {"ranks": lb.ranks}) if lb.status == LabelStatus.submitted else None),
                        weight_of[annotator_id])
                       for annotator_id, lb in sorted(by_member.items())]
            decision = vote(task.kind.value, ballots)
            labels.append(JudgeLabel(
                task_id=task_id, task_key=task.task_key, value=decision.value,
                confidence=decision.confidence,
                details={**decision.details, "members": sorted(members)},
                route=decision.route or (decision.confidence is not None and
                                         decision.confidence < config.routing.min_confidence)))
        stored = record_judge_labels(session=session, annotator_id=ensemble_id, labels=labels,
                                     priority=config.routing.priority)
        stats.tasks_pending = len(labels)
        for label, written in zip(labels, stored.written, strict=True):
            if not written:
                stats.already_labelled += 1
                continue
            stats.written += 1
            stats.valid += label.valid
            stats.invalid += not label.valid
            stats.routed += label.route
        return stats

    result = await asyncio.to_thread(db.run_write, combine)
    for ran in member_stats:
        result.requests += ran.requests
        result.spend_usd += ran.spend_usd
    return result


__all__ = ["combine_ensemble", "vote"]
