"""The deployment write path: register, promote, reject, rollback, with exact rows and audit."""

from __future__ import annotations

import threading

import pytest
from sqlmodel import col, select

from store import deployments
from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound
from store.models import AuditEvent, PolicyStatus, PolicyVersion
from tests.store import factories


def _register(db: Database, name: str, parent_id: int | None = None) -> int:
    policy = db.run_write(lambda s: deployments.register_policy(
        s, name=name, base_model="smollm2", weights_uri=f"runs/{name}/model",
        parent_id=parent_id))
    assert policy.id is not None
    return policy.id


def _statuses(db: Database) -> dict[str, PolicyStatus]:
    with db.read() as s:
        return {p.name: p.status for p in s.exec(select(PolicyVersion))}


def _audit(db: Database) -> list[tuple[int, str, dict | None, dict | None, int | None]]:
    with db.read() as s:
        rows = s.exec(select(AuditEvent).where(AuditEvent.entity == "policy_version")
                      .order_by(col(AuditEvent.id))).all()
    return [(r.entity_id, r.action, r.old, r.new, r.actor_id) for r in rows]


def test_register_writes_one_candidate_row_and_one_audit_event(db):
    v1 = _register(db, "v1")
    with db.read() as s:
        row = s.get(PolicyVersion, v1)
        assert row is not None
        assert (row.name, row.base_model, row.weights_uri, row.status, row.parent_id) == (
            "v1", "smollm2", "runs/v1/model", PolicyStatus.candidate, None)
    assert _audit(db) == [(v1, "register", None, {
        "status": "candidate", "name": "v1", "base_model": "smollm2",
        "weights_uri": "runs/v1/model", "parent_id": None, "round_id": None}, None)]


@pytest.mark.parametrize("fields, message", [
    ({"name": " "}, "needs a name"), ({"weights_uri": ""}, "needs a name"),
    ({"name": "42"}, "cannot be all digits")])
def test_register_refuses_bad_input_and_writes_nothing(db, fields, message):
    args = {"name": "v1", "base_model": "smollm2", "weights_uri": "runs/v1"} | fields
    with pytest.raises(InvalidInput, match=message):
        db.run_write(lambda s: deployments.register_policy(s, **args))
    assert _statuses(db) == {} and _audit(db) == []


def test_register_refuses_a_taken_name(db):
    _register(db, "v1")
    with pytest.raises(Conflict):
        _register(db, "v1")
    assert len(_audit(db)) == 1


def test_promote_retires_the_deployed_version_and_records_both_changes(db):
    with db.write() as s:
        ana = factories.annotator(s, "ana")
    v1, v2 = _register(db, "v1"), _register(db, "v2")
    db.run_write(lambda s: deployments.promote(s, policy_id=v1, actor="ana"))
    db.run_write(lambda s: deployments.promote(s, policy_id=v2, actor="round:2"))
    assert _statuses(db) == {"v1": PolicyStatus.retired, "v2": PolicyStatus.deployed}
    assert _audit(db)[2:] == [
        (v1, "promote", {"status": "candidate"},
         {"status": "deployed", "name": "v1", "actor": "ana", "previous_id": None}, ana.id),
        (v1, "retire", {"status": "deployed"},
         {"status": "retired", "name": "v1", "actor": "round:2",
          "reason": "replaced by 'v2'"}, None),
        (v2, "promote", {"status": "candidate"},
         {"status": "deployed", "name": "v2", "actor": "round:2", "previous_id": v1}, None),
    ]
    with db.read() as s:
        current = deployments.deployed(s)
        assert current is not None and current.id == v2


def test_promoting_the_deployed_version_again_changes_nothing(db):
    v1 = _register(db, "v1")
    db.run_write(lambda s: deployments.promote(s, policy_id=v1, actor="x"))
    before = _audit(db)
    db.run_write(lambda s: deployments.promote(s, policy_id=v1, actor="x"))
    assert _audit(db) == before


def test_a_rejected_version_cannot_be_promoted_and_the_reason_is_kept(db):
    v1 = _register(db, "v1")
    db.run_write(lambda s: deployments.reject(s, policy_id=v1, actor="round:1",
                                              reason="win rate 0.41 < 0.55"))
    with pytest.raises(Conflict, match=r"rejected \(win rate 0.41 < 0.55\)"):
        db.run_write(lambda s: deployments.promote(s, policy_id=v1, actor="ana"))
    assert _statuses(db) == {"v1": PolicyStatus.rejected}
    with db.read() as s:
        assert deployments.last_reason(s, policy_id=v1) == "win rate 0.41 < 0.55"
        assert deployments.deployed(s) is None


def test_reject_needs_a_reason_and_an_existing_version(db):
    v1 = _register(db, "v1")
    with pytest.raises(InvalidInput):
        db.run_write(lambda s: deployments.reject(s, policy_id=v1, actor="a", reason=" "))
    with pytest.raises(NotFound):
        db.run_write(lambda s: deployments.reject(s, policy_id=999, actor="a", reason="r"))
    assert _statuses(db) == {"v1": PolicyStatus.candidate}


def test_rejecting_the_deployed_version_restores_its_predecessor(db):
    v1, v2 = _register(db, "v1"), _register(db, "v2")
    for v in (v1, v2):
        db.run_write(lambda s, v=v: deployments.promote(s, policy_id=v, actor="round"))
    db.run_write(lambda s: deployments.reject(s, policy_id=v2, actor="serving",
                                              reason="smoke generation timed out"))
    assert _statuses(db) == {"v1": PolicyStatus.deployed, "v2": PolicyStatus.rejected}
    assert _audit(db)[-2:] == [
        (v2, "reject", {"status": "deployed"}, {"status": "rejected", "name": "v2",
                                                "actor": "serving",
                                                "reason": "smoke generation timed out"}, None),
        (v1, "rollback", {"status": "retired"},
         {"status": "deployed", "name": "v1", "actor": "serving",
          "reason": "'v2' rejected: smoke generation timed out", "previous_id": None}, None),
    ]


def test_rollback_goes_back_one_deployment_at_a_time_skipping_rejected_ones(db):
    v1, v2, v3, v4 = (_register(db, f"v{i}") for i in range(1, 5))
    for v in (v1, v2, v3):
        db.run_write(lambda s, v=v: deployments.promote(s, policy_id=v, actor="round"))
    db.run_write(lambda s: deployments.reject(s, policy_id=v2, actor="ana", reason="bad"))
    db.run_write(lambda s: deployments.promote(s, policy_id=v4, actor="round"))

    restored = db.run_write(lambda s: deployments.rollback(s, actor="ana"))
    assert restored.id == v3
    assert _statuses(db) == {"v1": PolicyStatus.retired, "v2": PolicyStatus.rejected,
                             "v3": PolicyStatus.deployed, "v4": PolicyStatus.retired}
    restored = db.run_write(lambda s: deployments.rollback(s, actor="ana"))
    assert restored.id == v1  # v2 was rejected in between
    assert _statuses(db)["v1"] == PolicyStatus.deployed
    with pytest.raises(Conflict, match="no earlier deployed version"):
        db.run_write(lambda s: deployments.rollback(s, actor="ana"))
    with db.read() as s:
        events = deployments.history(s, policy_id=v1, limit=2)
    assert [(e.action, e.old_status, e.new_status, e.actor, e.previous_id)
            for e in events] == [("rollback", "retired", "deployed", "ana", None),
                                 ("retire", "deployed", "retired", "round", None)]


def test_rollback_without_a_deployed_version_is_a_conflict(db):
    _register(db, "v1")
    with pytest.raises(Conflict, match="no policy version is deployed"):
        db.run_write(lambda s: deployments.rollback(s, actor="ana"))


def test_rollback_of_a_version_deployed_through_repo_falls_back_on_its_parent(db):
    from store import repo

    with db.write() as s:
        base = repo.create_policy_version(session=s, name="base", base_model="m",
                                          weights_uri="m", status=PolicyStatus.retired)
        repo.create_policy_version(session=s, name="child", base_model="m", weights_uri="c",
                                   parent_id=base.id, status=PolicyStatus.deployed)
    restored = db.run_write(lambda s: deployments.rollback(s, actor="ana"))
    assert restored.name == "base"
    assert _statuses(db) == {"base": PolicyStatus.deployed, "child": PolicyStatus.retired}


def test_find_policy_by_id_or_name(db):
    v1 = _register(db, "v1")
    with db.read() as s:
        assert deployments.find_policy(s, str(v1)).name == "v1"
        assert deployments.find_policy(s, " v1 ").id == v1
        with pytest.raises(NotFound, match="give its id or its name"):
            deployments.find_policy(s, "nope")


def test_concurrent_promotes_leave_exactly_one_deployed_version(db):
    ids = [_register(db, f"v{i}") for i in range(8)]
    errors: list[BaseException] = []

    def promote(policy_id: int) -> None:
        try:
            db.run_write(lambda s: deployments.promote(s, policy_id=policy_id, actor="t"))
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    statuses = list(_statuses(db).values())
    assert statuses.count(PolicyStatus.deployed) == 1
    assert statuses.count(PolicyStatus.retired) == 7
