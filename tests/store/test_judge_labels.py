"""The one writer of judge labels (store/judge_labels.py): stored once, replays and other runs'
labels reported as not written, routing only for what this call stored.

    python -m pytest -q tests/store/test_judge_labels.py
"""

from __future__ import annotations

from sqlmodel import select

from store.db import Database
from store.judge_labels import JudgeLabel, record_judge_labels
from store.models import AnnotatorKind, Label, LabelStatus, Task, TaskKind
from tests.store import factories


def test_labels_are_stored_once_and_routed_tasks_raised(db: Database) -> None:
    with db.write() as session:
        judge = factories.annotator(session, "ai:m:default@1", AnnotatorKind.ai)
        tasks = [factories.task(session, prompt=f"Q{i}") for i in range(3)]
        judge_id, ids = judge.id or 0, [t.id or 0 for t in tasks]
        keys = [t.task_key for t in tasks]
    labels = [
        JudgeLabel(ids[0], keys[0], {"choice": "a"}, confidence=0.9, shown_order=[1, 0]),
        JudgeLabel(ids[1], keys[1], None, details={"reason": "invalid_output"}, route=True),
        JudgeLabel(ids[2], keys[2], {"choice": "tie"}, confidence=0.0, route=True),
    ]
    with db.write() as session:
        first = record_judge_labels(session=session, annotator_id=judge_id, labels=labels,
                                    priority=7)
    assert first.written == [True, True, True] and first.priority_raised == 2
    with db.write() as session:  # a rerun: the same labels are replays, nothing is routed again
        again = record_judge_labels(session=session, annotator_id=judge_id, labels=labels,
                                    priority=9)
    assert again.written == [False, False, False] and again.priority_raised == 0
    other = JudgeLabel(ids[0], keys[0], {"choice": "b"})  # another run's different verdict
    with db.write() as session:
        assert record_judge_labels(session=session, annotator_id=judge_id, labels=[other],
                                   priority=7).written == [False]
    with db.read() as session:
        stored = {lb.task_id: lb for lb in session.exec(select(Label))}
        priorities = [session.get(Task, i).priority for i in ids]  # type: ignore[union-attr]
    assert len(stored) == 3
    assert (stored[ids[0]].choice, stored[ids[0]].shown_order) == ("a", [1, 0])
    assert stored[ids[1]].status == LabelStatus.invalid
    assert stored[ids[1]].details == {"reason": "invalid_output"}
    assert stored[ids[0]].idempotency_key == f"judge:{keys[0]}"
    assert priorities == [0, 7, 7]


def test_an_empty_batch_writes_nothing(db: Database) -> None:
    with db.write() as session:
        judge = factories.annotator(session, "rule:r@1", AnnotatorKind.rule)
        factories.task(session, kind=TaskKind.binary)
        result = record_judge_labels(session=session, annotator_id=judge.id or 0, labels=[],
                                     priority=10)
    assert result.written == [] and result.priority_raised == 0
