"""Calibration metrics on hand-computed values, and calibration + routing through the store."""

from __future__ import annotations

import asyncio

import pytest
from sqlmodel import select

from feedback.batch import BatchRunner
from feedback.calibrate import calibrate, calibration_metrics, cohen_kappa, route_tasks
from feedback.config import RuleJudgeConfig
from store import repo
from store.calibration import (
    CalibrationItem,
    label_weight,
    latest_agreements,
    latest_calibration,
    record_calibration,
)
from store.db import Database
from store.errors import InvalidInput
from store.models import AnnotatorKind, JudgeCalibration, LabelStatus, Task, TaskKind
from training.verifiable import CheckConfig

SUB, INV = LabelStatus.submitted, LabelStatus.invalid


def test_cohen_kappa_hand_computed() -> None:
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("a", "a")]
    # p_o = 0.8; p_e = 0.6 * 0.4 + 0.4 * 0.6 = 0.48; kappa = 0.32 / 0.52
    assert cohen_kappa(pairs) == pytest.approx(0.32 / 0.52)
    assert cohen_kappa([("a", "a"), ("b", "b")]) == 1.0
    assert cohen_kappa([("a", "b"), ("b", "a")]) == -1.0
    assert cohen_kappa([("a", "a")] * 3) is None  # one category only: undefined
    assert cohen_kappa([]) is None


def _orders(*choices: str, consistent: bool) -> dict:
    shown = [[0, 1], [1, 0]]
    return {"orders": [{"shown_order": s, "valid": True, "choice": c}
                       for s, c in zip(shown, choices, strict=True)], "consistent": consistent}


def test_calibration_metrics_hand_computed() -> None:
    P, L = TaskKind.pairwise, TaskKind.listwise
    items = [
        CalibrationItem(1, P, None, SUB, "a", None, _orders("a", "b", consistent=True), [10, 5],
                        human_choices=["a", "a", "b"]),
        CalibrationItem(2, P, None, SUB, "b", None, _orders("a", "a", consistent=False), [3, 8],
                        human_choices=["a"]),
        CalibrationItem(3, P, {"choice": "tie"}, SUB, "tie", None, None, [4, 4]),
        CalibrationItem(4, P, None, INV, None, None, None, [5, 5], human_choices=["b"]),
        CalibrationItem(5, P, None, SUB, "a", None, None, [5, 5], human_choices=["a", "b"]),
        CalibrationItem(6, L, None, SUB, None, [1, 2, 3], None, [1, 2, 3],
                        human_ranks=[[1, 2, 3], [2, 1, 3]]),
        CalibrationItem(7, P, None, SUB, "a", None, None, [9, 1]),  # no reference at all
    ]
    n, m = calibration_metrics(items)
    # References: 1 (human a), 2 (human a), 3 (gold tie), 4 (human b; judge invalid),
    # 6 (pairs (0,2) and (1,2) -> i; (0,1) has no majority); 5 has no majority, 7 no labels.
    assert n == 5
    # compared: (a,a) (b,a) (tie,tie) (i,i) (i,i)
    assert m["n_compared"] == 5
    assert m["agreement"] == pytest.approx(0.8)
    # judge marginals a1 b1 tie1 i2, reference a2 tie1 i2: p_e = (2 + 1 + 4) / 25
    assert m["cohen_kappa"] == pytest.approx((0.8 - 0.28) / 0.72)
    assert m["invalid_rate"] == pytest.approx(1 / 5)
    assert m["position_consistency"] == 0.5
    assert m["first_position_win_rate"] == 0.75  # a, b, a, a shown-first wins 3 of 4
    assert m["longer_response_win_rate"] == 1.0  # tasks 1 (a longer) and 2 (b longer); 7 too
    assert m["human_longer_response_win_rate"] == pytest.approx(2 / 4)
    assert m["invalid_rate_all"] == pytest.approx(1 / 7)
    assert m["by_kind"]["listwise"] == {"agreement": 1.0, "cohen_kappa": None, "n_compared": 2}


def _rule_config() -> RuleJudgeConfig:
    return RuleJudgeConfig(name="exact", checks=(CheckConfig(type="answer_match"),))


def _task_with_humans(session, i: int, answers: tuple[str, str], humans: list[str],
                      reference: str = "4") -> int:
    p = repo.get_or_create_prompt(session=session, content=f"What is 2+2? ({i})",
                                  reference=reference)
    ids = [repo.get_or_create_completion(session=session, prompt_id=p.id, content=a,
                                         origin="external:t").id for a in answers]
    task, _ = repo.get_or_create_task(session=session, kind=TaskKind.pairwise, prompt_id=p.id,
                                      completion_ids=ids)
    for h, choice in enumerate(humans):
        person = repo.get_or_create_annotator(session=session, name=f"human{h}",
                                              kind=AnnotatorKind.human)
        repo.submit_label(session=session, task_id=task.id, annotator_id=person.id,
                          value={"choice": choice})
    return task.id


def test_calibrate_stores_metrics_per_judge_identity(db: Database) -> None:
    with db.write() as session:
        t1 = _task_with_humans(session, 1, ("4", "5"), ["a", "a"])
        t2 = _task_with_humans(session, 2, ("5", "4"), ["b"])
        t3 = _task_with_humans(session, 3, ("4", "four"), ["b", "b", "a"])  # humans disagree
        t4 = _task_with_humans(session, 4, ("3", "4"), [])  # no human label
    config = _rule_config()
    stats = asyncio.run(BatchRunner(db, config).run())
    assert stats.written == 4
    result = calibrate(db, config)
    # judge: t1 a (agree), t2 b (agree), t3 a (humans' majority b): 2 of 3
    assert result.n_tasks == 3
    assert result.metrics["agreement"] == pytest.approx(2 / 3)
    assert result.metrics["invalid_rate"] == 0.0
    with db.read() as session:
        stored = latest_calibration(session=session, annotator_id=result.annotator_id)
        assert stored is not None and stored.metrics == result.metrics
        assert latest_agreements(session=session) == {result.annotator_id: pytest.approx(2 / 3)}
    # Routing: calibrated confidence is not available for rule labels (None), so only the
    # unlabelled-by-humans tasks the judges disagree on are routed; with one judge: none.
    assert route_tasks(db, [config], min_confidence=0.6, priority=5)["routed"] == 0
    with db.read() as session:
        assert {t.id: t.priority for t in session.exec(select(Task))} == {
            t1: 0, t2: 0, t3: 0, t4: 0}


def test_route_tasks_where_judges_disagree(db: Database) -> None:
    with db.write() as session:
        agree = _task_with_humans(session, 1, ("4", "5"), [])
        differ = _task_with_humans(session, 2, ("4.0", "5"), [])
        human_done = _task_with_humans(session, 3, ("4.0", "5"), ["a"])
    exact = _rule_config()
    numeric = RuleJudgeConfig(name="numeric", checks=(CheckConfig(type="answer_match",
                                                                  mode="numeric"),))
    for config in (exact, numeric):
        asyncio.run(BatchRunner(db, config).run())
    counts = route_tasks(db, [exact, numeric], min_confidence=0.6, priority=9)
    # exact says "4.0" != "4" (both_bad), numeric says a: they disagree on tasks 2 and 3;
    # task 3 already has a human label, so only task 2 moves up.
    assert counts == {"disagreement": 1, "low_confidence": 0, "routed": 1,
                      "priority_raised": 1}
    with db.read() as session:
        assert session.get(Task, differ).priority == 9
        assert session.get(Task, agree).priority == 0
        assert session.get(Task, human_done).priority == 0


def test_calibrate_against_another_judge_and_route_a_rounds_disputed_tasks(db: Database
                                                                            ) -> None:
    with db.write() as session:
        t1 = _task_with_humans(session, 1, ("4", "5"), ["b"])  # humans are not the reference
        t2 = _task_with_humans(session, 2, ("4.0", "5"), [])
        t3 = _task_with_humans(session, 3, ("5", "4"), [])
        t4 = _task_with_humans(session, 4, ("4", "4.0"), [])
    exact = _rule_config()
    numeric = RuleJudgeConfig(name="numeric", checks=(CheckConfig(type="answer_match",
                                                                  mode="numeric"),))
    for config in (exact, numeric):
        asyncio.run(BatchRunner(db, config).run())
    result = calibrate(db, numeric, against=exact.annotator_name)
    # exact: a, both_bad, b, a; numeric: a, a, b, tie -> 2 of 4 agree; on the 3 references
    # that pick a side (t1, t3, t4): 2 of 3.
    assert result.n_tasks == 4
    m = result.metrics
    assert (m["agreement"], m["n_compared"]) == (pytest.approx(0.5), 4)
    assert (m["agreement_decisive"], m["n_decisive"]) == (pytest.approx(2 / 3), 3)
    assert m["reference"] == "rule:exact@1"
    # Only the round's tasks (t1, t2): the judges dispute t2; t4's dispute is not this round's.
    counts = route_tasks(db, [numeric], min_confidence=0.6, priority=7, task_ids=[t1, t2],
                         extra_annotators=[exact.annotator_name])
    assert counts == {"disagreement": 1, "low_confidence": 0, "routed": 1,
                      "priority_raised": 1}
    with db.read() as session:
        assert {t.id: t.priority for t in session.exec(select(Task))} == {
            t1: 0, t2: 7, t3: 0, t4: 0}


def test_record_calibration_refuses_humans_and_label_weight(db: Database) -> None:
    with db.write() as session:
        person = repo.get_or_create_annotator(session=session, name="p",
                                              kind=AnnotatorKind.human)
        judge = repo.get_or_create_annotator(session=session, name="ai:x", kind=AnnotatorKind.ai)
        with pytest.raises(InvalidInput):
            record_calibration(session=session, annotator_id=person.id, n_tasks=1, metrics={})
        record_calibration(session=session, annotator_id=judge.id, n_tasks=3,
                           metrics={"agreement": 0.5})
        record_calibration(session=session, annotator_id=judge.id, n_tasks=9,
                           metrics={"agreement": 0.75})
        assert session.exec(select(JudgeCalibration)).all().__len__() == 2
        agreements = latest_agreements(session=session)
        assert agreements == {judge.id: 0.75}
    assert label_weight(AnnotatorKind.human, 1, agreements) == 1.0
    assert label_weight(AnnotatorKind.ai, judge.id, agreements) == 0.75
    assert label_weight(AnnotatorKind.ai, judge.id, agreements, min_agreement=0.8) == 0.0
    assert label_weight(AnnotatorKind.ai, 999, agreements) == 0.0
