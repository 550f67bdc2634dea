"""The promotion gate: win rates from stored eval labels (ties half or dropped) and the decision.

The tallies are checked against hand-counted labels on a real SQLite store: which canonical
position is the candidate alternates per task, exactly as the evaluate stage writes them.
"""

from __future__ import annotations

import pytest

from loop.config import EvaluateConfig, RoundConfigError
from loop.decision import promotion_decision, win_rates
from store import repo
from store.models import AnnotatorKind, LabelStatus, TaskKind

# (choice, candidate is position a) for one judge over 8 eval tasks:
# candidate wins 3 (a/first, b/second, a/first), loses 1, ties 3 (tie, both_bad, tie), 1 invalid.
VERDICTS = [("a", True), ("b", False), ("a", True), ("a", False),
            ("tie", True), ("both_bad", False), ("tie", True), (None, False)]


@pytest.fixture
def eval_tasks(sqlite_db):
    """Eight pairwise eval tasks labelled by one rule judge as VERDICTS says."""
    candidate_first: dict[int, bool] = {}
    with sqlite_db.write() as session:
        judge = repo.get_or_create_annotator(session=session, name="rule:j@1",
                                             kind=AnnotatorKind.rule)
        for index, (choice, first) in enumerate(VERDICTS):
            prompt = repo.get_or_create_prompt(
                session=session, content=[{"role": "user", "content": f"q{index}"}])
            a = repo.get_or_create_completion(session=session, prompt_id=prompt.id,
                                              content=f"a{index}", origin="test")
            b = repo.get_or_create_completion(session=session, prompt_id=prompt.id,
                                              content=f"b{index}", origin="test")
            task, _ = repo.get_or_create_task(session=session, kind=TaskKind.pairwise,
                                              prompt_id=prompt.id, completion_ids=[a.id, b.id])
            candidate_first[task.id] = first
            repo.record_label(
                session=session, task_id=task.id, annotator_id=judge.id,
                value=None if choice is None else {"choice": choice},
                status=LabelStatus.invalid if choice is None else LabelStatus.submitted)
    return candidate_first


def test_win_rates_count_wins_losses_ties_and_invalid_exactly(sqlite_db, eval_tasks):
    with sqlite_db.read() as session:
        rates = win_rates(session, list(eval_tasks), eval_tasks, judges=["rule:j@1"])
    stats = rates["rule:j@1"]
    assert (stats["wins"], stats["losses"], stats["ties"], stats["invalid"], stats["n"]) == \
        (3, 1, 3, 1, 7)
    assert stats["win_rate"] == pytest.approx((3 + 0.5 * 3) / 7)
    assert stats["decisive_win_rate"] == pytest.approx(3 / 4)


def test_empty_answers_count_for_every_judge(sqlite_db, eval_tasks):
    empty = {"candidate_only": 2, "deployed_only": 1, "both": 1}
    with sqlite_db.read() as session:
        stats = win_rates(session, list(eval_tasks), eval_tasks, empty=empty,
                          judges=["rule:j@1"])["rule:j@1"]
    assert (stats["wins"], stats["losses"], stats["ties"]) == (4, 3, 4)
    assert stats["decisive_win_rate"] == pytest.approx(4 / 7)


@pytest.mark.parametrize(("win_rate", "decisive", "min_decisive", "promote", "reason"), [
    (None, 0, 0, False, "no valid eval verdicts"),
    (0.75, 4, 6, False, "4 decisive verdicts < min_decisive 6"),
    (0.75, 6, 6, True, "win rate 0.750 (ties drop) >= 0.55"),
    (0.55, 6, 0, True, "win rate 0.550 (ties drop) >= 0.55"),
    (0.5, 40, 6, False, "win rate 0.500 (ties drop) < 0.55"),
])
def test_promotion_decision(win_rate, decisive, min_decisive, promote, reason):
    assert promotion_decision(win_rate, decisive, threshold=0.55, min_decisive=min_decisive,
                              ties="drop") == (promote, reason)


@pytest.mark.parametrize("bad", [{"ties": "third"}, {"min_decisive": -1},
                                 {"win_rate_threshold": 1.5}])
def test_bad_gate_settings_are_refused(bad):
    with pytest.raises(RoundConfigError):
        EvaluateConfig(**bad)
