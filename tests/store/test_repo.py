"""The write path: one label per (task, annotator), idempotency, validation, audit trail."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlmodel import select

from store import repo
from store.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from store.models import (
    AnnotatorKind,
    AuditEvent,
    Label,
    LabelStatus,
    PolicyStatus,
    TaskKind,
)
from tests.store import factories


def _labels(db):
    with db.read() as s:
        return s.exec(select(Label).order_by(Label.id)).all()


def test_submit_stores_exactly_one_row_with_audit_event(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
        result = repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                                   value={"choice": "a"}, shown_order=[1, 0], rationale="clear",
                                   idempotency_key="k1", request_id="req-1")
    assert not result.replayed
    [label] = _labels(db)
    assert (label.task_id, label.annotator_id, label.choice, label.shown_order, label.rationale,
            label.status) == (task.id, alice.id, "a", [1, 0], "clear", LabelStatus.submitted)
    with db.read() as s:
        [event] = s.exec(select(AuditEvent)).all()
    assert (event.entity, event.entity_id, event.action, event.actor_id, event.request_id) == (
        "label", label.id, "create", alice.id, "req-1")
    assert event.new["choice"] == "a" and event.old is None


def test_same_idempotency_key_and_body_replays_the_stored_label(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
        first = repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                                  value={"choice": "tie"}, idempotency_key="k1")
    with db.write() as s:
        again = repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                                  value={"choice": "tie"}, idempotency_key="k1")
    assert again.replayed and again.label.id == first.label.id
    assert len(_labels(db)) == 1


def test_same_idempotency_key_with_another_body_is_refused_and_changes_nothing(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                          value={"choice": "a"}, idempotency_key="k1")
    with pytest.raises(IdempotencyMismatch), db.write() as s:
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                          value={"choice": "b"}, idempotency_key="k1")
    [label] = _labels(db)
    assert label.choice == "a"


def test_second_label_by_same_annotator_is_a_conflict(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                          value={"choice": "a"})
    with pytest.raises(Conflict), db.write() as s:
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                          value={"choice": "b"}, idempotency_key="other")
    assert [label.choice for label in _labels(db)] == ["a"]


def test_human_and_ai_labels_on_one_task_never_overwrite_each_other(db):
    with db.write() as s:
        task = factories.task(s)
        human = factories.annotator(s, "alice")
        judge = factories.annotator(s, "judge:gpt:v1", AnnotatorKind.ai)
        repo.submit_label(session=s, task_id=task.id, annotator_id=human.id,
                          value={"choice": "a"})
        repo.submit_label(session=s, task_id=task.id, annotator_id=judge.id,
                          value={"choice": "b"}, confidence=0.9)
    assert [(label.annotator_id, label.choice) for label in _labels(db)] == [
        (human.id, "a"), (judge.id, "b")]


def test_an_ai_judge_cannot_reuse_a_human_name(db):
    with db.write() as s:
        factories.annotator(s, "alice")
    with pytest.raises(Conflict), db.write() as s:
        factories.annotator(s, "alice", AnnotatorKind.ai)


@pytest.mark.parametrize(
    ("kind", "value", "error"),
    [
        (TaskKind.pairwise, {"choice": "c"}, InvalidInput),
        (TaskKind.pairwise, {"choice": "up"}, InvalidInput),
        (TaskKind.pairwise, {"ranks": [1, 2]}, InvalidInput),
        (TaskKind.binary, {"choice": "a"}, InvalidInput),
        (TaskKind.listwise, {"ranks": [1, 2]}, InvalidInput),
        (TaskKind.listwise, {"ranks": [1, 3, 3]}, InvalidInput),
        (TaskKind.listwise, {"choice": "a"}, InvalidInput),
        (TaskKind.pairwise, None, InvalidInput),
    ],
)
def test_wrong_label_shape_is_refused_and_writes_nothing(db, kind, value, error):
    with db.write() as s:
        task = factories.task(s, kind)
        alice = factories.annotator(s, "alice")
    with pytest.raises(error), db.write() as s:
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id, value=value)
    assert _labels(db) == []
    with db.read() as s:
        assert s.exec(select(AuditEvent)).all() == []


def test_unknown_task_and_bad_shown_order_and_confidence_are_refused(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
    for kwargs, error in [
        ({"task_id": 999}, NotFound),
        ({"shown_order": [0, 0]}, InvalidInput),
        ({"confidence": 1.5}, InvalidInput),
        ({"idempotency_key": "x" * 201}, InvalidInput),
    ]:
        args = {"task_id": task.id, "annotator_id": alice.id, "value": {"choice": "a"}} | kwargs
        with pytest.raises(error), db.write() as s:
            repo.submit_label(session=s, **args)
    assert _labels(db) == []


def test_invalid_judge_output_is_stored_as_invalid_without_a_value(db):
    with db.write() as s:
        task = factories.task(s)
        judge = factories.annotator(s, "judge", AnnotatorKind.ai)
        repo.submit_label(session=s, task_id=task.id, annotator_id=judge.id, value=None,
                          status=LabelStatus.invalid, details={"raw": "I think A... or B"})
    [label] = _labels(db)
    assert (label.status, label.choice, label.details) == (
        LabelStatus.invalid, None, {"raw": "I think A... or B"})


def test_update_and_delete_leave_a_complete_audit_trail(db):
    with db.write() as s:
        task = factories.task(s, TaskKind.listwise)
        alice = factories.annotator(s, "alice")
        label = repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                                  value={"ranks": [1, 2, 3]}).label
    for ranks in ([2, 1, 3], [1, 1, 2], [3, 2, 1]):
        with db.write() as s:
            repo.update_label(session=s, label_id=label.id, actor_id=alice.id,
                              value={"ranks": ranks}, request_id=f"edit-{ranks}")
    with db.write() as s:
        repo.delete_label(session=s, label_id=label.id, actor_id=alice.id)
    assert _labels(db) == []
    with db.read() as s:
        events = s.exec(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [e.action for e in events] == ["create", "update", "update", "update", "delete"]
    history = [e.new["ranks"] for e in events[:4]]
    assert history == [[1, 2, 3], [2, 1, 3], [1, 1, 2], [3, 2, 1]]
    assert [e.old["ranks"] for e in events[1:]] == [[1, 2, 3], [2, 1, 3], [1, 1, 2], [3, 2, 1]]


def test_audit_events_cannot_be_edited_or_deleted(db):
    with db.write() as s:
        task = factories.task(s)
        alice = factories.annotator(s, "alice")
        repo.submit_label(session=s, task_id=task.id, annotator_id=alice.id,
                          value={"choice": "a"})
    for statement in ("UPDATE audit_event SET action = 'delete'", "DELETE FROM audit_event"):
        with pytest.raises(DBAPIError, match="append-only"), db.write() as s:
            s.exec(text(statement))
    with db.read() as s:
        assert [e.action for e in s.exec(select(AuditEvent)).all()] == ["create"]


def test_task_over_the_same_pair_in_either_order_is_one_task(db):
    with db.write() as s:
        p = repo.get_or_create_prompt(session=s, content="q")
        x = repo.get_or_create_completion(session=s, prompt_id=p.id, content="x", origin="o").id
        y = repo.get_or_create_completion(session=s, prompt_id=p.id, content="y", origin="o").id
        first, created_first = repo.get_or_create_task(
            session=s, kind=TaskKind.pairwise, prompt_id=p.id, completion_ids=[x, y])
        second, created_second = repo.get_or_create_task(
            session=s, kind=TaskKind.pairwise, prompt_id=p.id, completion_ids=[y, x])
        assert (created_first, created_second, first.id) == (True, False, second.id)
        assert repo.task_completion_ids(session=s, task_id=first.id) == [x, y]


def test_task_refuses_wrong_counts_and_foreign_completions(db):
    with db.write() as s:
        p = repo.get_or_create_prompt(session=s, content="q")
        other = repo.get_or_create_prompt(session=s, content="another")
        x = repo.get_or_create_completion(session=s, prompt_id=p.id, content="x", origin="o").id
        z = repo.get_or_create_completion(session=s, prompt_id=other.id, content="z",
                                          origin="o").id
    for kind, ids, error in [(TaskKind.pairwise, [x], InvalidInput),
                             (TaskKind.binary, [x, z], InvalidInput),
                             (TaskKind.pairwise, [x, z], InvalidInput),
                             (TaskKind.pairwise, [x, x], InvalidInput),
                             (TaskKind.pairwise, [x, 999], NotFound)]:
        with pytest.raises(error), db.write() as s:
            repo.get_or_create_task(session=s, kind=kind, prompt_id=p.id, completion_ids=ids)


def test_deploying_a_policy_retires_the_previous_one(db):
    with db.write() as s:
        v0 = repo.create_policy_version(session=s, name="v0", base_model="smollm2",
                                        status=PolicyStatus.deployed)
        v1 = repo.create_policy_version(session=s, name="v1", base_model="smollm2",
                                        parent_id=v0.id, weights_uri="runs/r1/ckpt")
        repo.set_policy_status(session=s, policy_id=v1.id, status=PolicyStatus.deployed)
    with db.read() as s:
        from store.models import PolicyVersion

        statuses = {p.name: (p.status, p.parent_id) for p in s.exec(select(PolicyVersion))}
    assert statuses == {"v0": (PolicyStatus.retired, None), "v1": (PolicyStatus.deployed, v0.id)}
    with pytest.raises(Conflict), db.write() as s:
        repo.create_policy_version(session=s, name="v1", base_model="x")


def test_absent_json_values_are_sql_null_so_is_null_filters_see_them(db):
    from store.models import Task

    with db.write() as s:
        plain = factories.task(s)
        gold = factories.task(s, TaskKind.binary, prompt="gold?")
        gold.gold = {"choice": "up"}
        s.add(gold)
        alice = factories.annotator(s, "alice")
        repo.submit_label(session=s, task_id=plain.id, annotator_id=alice.id,
                          value={"choice": "a"})
    with db.read() as s:
        assert s.exec(select(Task.id).where(Task.gold.is_(None))).all() == [plain.id]
        assert s.exec(select(Task.id).where(Task.gold.is_not(None))).all() == [gold.id]
        assert s.exec(text("SELECT COUNT(*) FROM label WHERE ranks IS NULL AND details IS NULL "
                           "AND shown_order IS NULL")).one()[0] == 1


def test_record_label_core_path_matches_the_orm_row_and_its_audit_event(db):
    """The Core write path (`record_label`, used by the web service with the task's shape
    already known) stores the same row and audit event as the ORM API, and replays/refuses
    by the same rules."""
    with db.write() as s:
        task = factories.task(s, TaskKind.listwise, k=3)
        alice = factories.annotator(s, "alice")
        task_id, alice_id = task.id, alice.id
        stored = repo.record_label(session=s, task_id=task_id, annotator_id=alice_id,
                                   value={"ranks": [2, 1, 2]}, shown_order=[2, 0, 1],
                                   rationale="why", idempotency_key="k1", request_id="req-9",
                                   shape=repo.TaskShape(TaskKind.listwise, 3))
    assert not stored.replayed
    [label] = _labels(db)
    assert (stored.id, stored.task_id, stored.ranks, stored.shown_order, stored.rationale) == (
        label.id, task_id, [2, 1, 2], [2, 0, 1], "why")
    assert label.request_hash is not None and label.status == LabelStatus.submitted
    with db.read() as s:
        [event] = s.exec(select(AuditEvent)).all()
    assert (event.entity, event.entity_id, event.action, event.actor_id, event.request_id,
            event.old) == ("label", label.id, "create", alice_id, "req-9", None)
    assert event.new == repo.label_snapshot(label)
    # Replay without the shape (the task is read), then a different body, then another key.
    with db.write() as s:
        again = repo.record_label(session=s, task_id=task_id, annotator_id=alice_id,
                                  value={"ranks": [2, 1, 2]}, shown_order=[2, 0, 1],
                                  rationale="why", idempotency_key="k1")
    assert again.replayed and again.id == label.id and again.ranks == [2, 1, 2]
    assert again.created_at == stored.created_at.replace(microsecond=again.created_at.microsecond)
    with pytest.raises(IdempotencyMismatch), db.write() as s:
        repo.record_label(session=s, task_id=task_id, annotator_id=alice_id,
                          value={"ranks": [1, 2, 3]}, shown_order=[2, 0, 1],
                          rationale="why", idempotency_key="k1")
    with pytest.raises(Conflict), db.write() as s:
        repo.record_label(session=s, task_id=task_id, annotator_id=alice_id,
                          value={"ranks": [1, 2, 3]}, idempotency_key="k2")
    with pytest.raises(NotFound), db.write() as s:
        repo.record_label(session=s, task_id=task_id, annotator_id=alice_id + 1000,
                          value={"ranks": [1, 2, 3]}, idempotency_key="k3")
    assert len(_labels(db)) == 1
    with db.read() as s:
        assert len(s.exec(select(AuditEvent)).all()) == 1
