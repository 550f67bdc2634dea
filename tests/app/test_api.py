"""The REST API on SQLite and PostgreSQL: assignment, leases, labels, idempotency, bad input."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlmodel import func, select

from store.db import Database
from store.models import AuditEvent, Label, LeaseState, TaskKind
from store.values import pairwise_shown_to_canonical, ranking_to_ranks, ranks_shown_to_canonical
from tests.app.conftest import bearer
from tests.app.helpers import add_task, add_user, labels_of, lease

Client = Callable[..., TestClient]


def _count(db: Database, model: type) -> int:
    with db.read() as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def _submit(client: TestClient, token: str, task_id: int, body: dict, key: str = "k1"):
    return client.post(f"/api/tasks/{task_id}/labels", json=body,
                       headers={**bearer(token), "Idempotency-Key": key})


def test_pairwise_label_is_stored_in_canonical_order(db: Database, make_client: Client) -> None:
    client = make_client(db)
    bob, token = add_user(db, "bob")
    task_id = add_task(db, TaskKind.pairwise, completions=["first", "second"])
    got = client.get("/api/tasks/next?kind=pairwise", headers=bearer(token)).json()["task"]
    shown = lease(db, task_id, bob).shown_order
    assert [c["content"] for c in got["completions"]] == [["first", "second"][p] for p in shown]
    response = _submit(client, token, task_id, {"choice": "a", "rationale": "clearer"})
    assert response.status_code == 201
    assert response.json()["choice"] == "a"
    [label] = labels_of(db, task_id)
    assert (label.choice, label.shown_order, label.rationale, label.idempotency_key) == (
        pairwise_shown_to_canonical("a", shown), shown, "clearer", "k1")
    assert lease(db, task_id, bob).state == LeaseState.submitted


def test_listwise_ranking_with_ties_and_binary(db: Database, make_client: Client) -> None:
    client = make_client(db)
    bob, token = add_user(db, "bob")
    lw = add_task(db, TaskKind.listwise)
    bi = add_task(db, TaskKind.binary)
    assert client.get("/api/tasks/next?kind=listwise", headers=bearer(token)).status_code == 200
    response = _submit(client, token, lw, {"ranking": [2, [0, 1]]})
    assert response.status_code == 201 and response.json()["ranking"] == [2, [0, 1]]
    shown = lease(db, lw, bob).shown_order
    assert labels_of(db, lw)[0].ranks == ranks_shown_to_canonical(
        ranking_to_ranks([2, [0, 1]], 3), shown)
    client.get("/api/tasks/next?kind=binary", headers=bearer(token))
    assert _submit(client, token, bi, {"value": "down"}, key="k2").json()["value"] == "down"
    assert labels_of(db, bi)[0].choice == "down"


def test_idempotency_replay_mismatch_and_second_label(db: Database,
                                                      make_client: Client) -> None:
    client = make_client(db)
    _, token = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(token))
    first = _submit(client, token, task_id, {"choice": "tie"})
    again = _submit(client, token, task_id, {"choice": "tie"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {**first.json(), "replayed": True}
    other_body = _submit(client, token, task_id, {"choice": "a"})
    assert other_body.status_code == 422 and "Idempotency-Key" in other_body.json()["detail"]
    other_key = _submit(client, token, task_id, {"choice": "tie"}, key="k2")
    assert other_key.status_code == 409
    assert [lab.choice for lab in labels_of(db, task_id)] == ["tie"]
    assert _count(db, AuditEvent) == 1


def test_bad_input_is_4xx_and_writes_nothing(db: Database, make_client: Client) -> None:
    client = make_client(db, max_body_bytes=20_000)
    _, token = add_user(db, "bob")
    pair = add_task(db)
    lw = add_task(db, TaskKind.listwise)
    client.get("/api/tasks/next?kind=pairwise", headers=bearer(token))
    client.get("/api/tasks/next?kind=listwise", headers=bearer(token))
    cases = [
        (pair, {"ranking": [0, 1]}, 422, "a pairwise label is"),
        (pair, {"choice": "c"}, 422, ""),
        (pair, {"choice": "a", "value": "up"}, 422, "a pairwise label is"),
        (pair, {}, 422, "a pairwise label is"),
        (pair, {"choice": "a", "extra": 1}, 422, ""),
        (pair, {"choice": "a", "rationale": "x" * 10_001}, 422, ""),
        (lw, {"ranking": [0, 0, 1]}, 422, "twice"),
        (lw, {"ranking": [0, 1]}, 422, "not a permutation"),
        (lw, {"ranking": [0, 1, 7]}, 422, "there are 3"),
        (lw, {"ranking": [0, [], 1]}, 422, ""),
        (lw, {"ranking": [True, 0, 1]}, 422, ""),
        (999_999, {"choice": "a"}, 404, "not assigned to you"),
        (pair, {"choice": "a", "rationale": "y" * 25_000}, 413, "request body over"),
    ]
    for task_id, body, status, message in cases:
        response = _submit(client, token, task_id, body)
        assert response.status_code == status, (body, response.text)
        assert message in str(response.json()["detail"])
    no_key = client.post(f"/api/tasks/{pair}/labels", json={"choice": "a"},
                         headers=bearer(token))
    assert no_key.status_code == 422
    not_json = client.post(f"/api/tasks/{pair}/labels", content=b"{not json",
                           headers={**bearer(token), "Idempotency-Key": "z",
                                    "Content-Type": "application/json"})
    assert not_json.status_code == 422
    assert client.get("/api/tasks/next?kind=ranking", headers=bearer(token)).status_code == 422
    assert client.post("/api/tasks/0/labels", json={"choice": "a"},
                       headers={**bearer(token), "Idempotency-Key": "z"}).status_code == 422
    assert (_count(db, Label), _count(db, AuditEvent)) == (0, 0)


def test_overlap_leases_and_expiry(db: Database, make_client: Client) -> None:
    client = make_client(db, lease_ttl_s=0.5)
    ann, tok_a = add_user(db, "ann")
    bob, tok_b = add_user(db, "bob")
    cat, tok_c = add_user(db, "cat")
    task_id = add_task(db, overlap=2)

    def next_id(token: str) -> int | None:
        task = client.get("/api/tasks/next", headers=bearer(token)).json()["task"]
        return task and task["task_id"]

    assert next_id(tok_a) == task_id
    assert next_id(tok_a) == task_id  # a reload gives back the same lease
    assert next_id(tok_b) == task_id
    assert next_id(tok_c) is None  # two slots, both leased
    assert _submit(client, tok_a, task_id, {"choice": "a"}).status_code == 201
    assert next_id(tok_a) is None  # never the same task twice
    time.sleep(0.6)  # bob's lease expires: its slot is offered again
    assert next_id(tok_c) == task_id
    late = _submit(client, tok_b, task_id, {"choice": "b"})
    assert late.status_code == 409 and "expired" in late.json()["detail"]
    assert _submit(client, tok_c, task_id, {"choice": "b"}).status_code == 201
    assert [lab.annotator_id for lab in labels_of(db, task_id)] == [ann, cat]
    assert lease(db, task_id, bob).state == LeaseState.expired


def test_expired_lease_can_still_submit_while_slot_is_free(db: Database,
                                                           make_client: Client) -> None:
    client = make_client(db, lease_ttl_s=0.3)
    _, token = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(token))
    time.sleep(0.4)
    assert _submit(client, token, task_id, {"choice": "b"}).status_code == 201


def test_skip_is_never_offered_again_and_frees_the_slot(db: Database,
                                                         make_client: Client) -> None:
    client = make_client(db)
    _, tok_a = add_user(db, "ann")
    _, tok_b = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(tok_a))
    assert client.get("/api/tasks/next", headers=bearer(tok_b)).json() == {
        "task": None, "message": "No pairwise tasks are waiting for you right now."}
    assert client.post(f"/api/tasks/{task_id}/skip", headers=bearer(tok_a)).status_code == 204
    assert client.get("/api/tasks/next", headers=bearer(tok_a)).json()["task"] is None
    assert client.get("/api/tasks/next", headers=bearer(tok_b)).json()["task"]["task_id"] == (
        task_id)
    assert _submit(client, tok_a, task_id, {"choice": "a"}).status_code == 409


def test_priority_then_age_and_other_annotators_labels_stay_hidden(
        db: Database, make_client: Client) -> None:
    client = make_client(db)
    _, tok_a = add_user(db, "ann")
    _, tok_b = add_user(db, "bob")
    low = add_task(db, prompt="low")
    high = add_task(db, prompt="high", priority=5, overlap=2)
    first = client.get("/api/tasks/next", headers=bearer(tok_a)).json()["task"]
    assert first["task_id"] == high
    _submit(client, tok_a, high, {"choice": "a", "rationale": "secret reason"})
    seen = client.get("/api/tasks/next", headers=bearer(tok_b)).json()
    assert seen["task"]["task_id"] == high
    assert "secret reason" not in str(seen) and "choice" not in str(seen)
    assert client.get("/api/me/labels", headers=bearer(tok_b)).json() == {"labels": [],
                                                                          "total": 0}
    assert low != high


def test_undo_within_grace_period_reopens_the_task(db: Database, make_client: Client) -> None:
    client = make_client(db, undo_grace_s=60)
    _, token = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(token))
    label_id = _submit(client, token, task_id, {"choice": "a"}).json()["label_id"]
    assert client.delete(f"/api/me/labels/{label_id}", headers=bearer(token)).status_code == 204
    assert labels_of(db, task_id) == []
    assert client.get("/api/tasks/next", headers=bearer(token)).json()["task"]["task_id"] == (
        task_id)
    assert _submit(client, token, task_id, {"choice": "b"}, key="k2").status_code == 201
    with db.read() as session:
        actions = [e.action for e in session.exec(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions == ["create", "delete", "create"]


def test_undo_after_grace_period_is_refused(db: Database, make_client: Client) -> None:
    client = make_client(db, undo_grace_s=0)
    _, token = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(token))
    label_id = _submit(client, token, task_id, {"choice": "a"}).json()["label_id"]
    response = client.delete(f"/api/me/labels/{label_id}", headers=bearer(token))
    assert response.status_code == 409 and "grace period" in response.json()["detail"]
    assert len(labels_of(db, task_id)) == 1


def test_gold_tasks_are_mixed_in_and_scored(db: Database, make_client: Client) -> None:
    client = make_client(db, gold_rate=1.0)
    _, admin = add_user(db, "root", "admin")
    ann, tok_a = add_user(db, "ann")
    bob, tok_b = add_user(db, "bob")
    add_task(db, prompt="normal")
    gold = add_task(db, prompt="gold", completions=["right", "wrong"],
                    gold={"choice": "a"})
    for token, pick_right in ((tok_a, True), (tok_b, False)):
        task = client.get("/api/tasks/next", headers=bearer(token)).json()["task"]
        assert task["task_id"] == gold  # gold_rate 1: gold first; every annotator gets it
        shown_first = task["completions"][0]["content"]
        choice = "a" if (shown_first == "right") == pick_right else "b"
        assert _submit(client, token, gold, {"choice": choice}).status_code == 201
    stats = client.get("/api/stats", headers=bearer(admin)).json()
    by_name = {a["name"]: a for a in stats["annotators"]}
    assert (by_name["ann"]["gold_correct"], by_name["ann"]["gold_answered"]) == (1, 1)
    assert (by_name["bob"]["gold_correct"], by_name["bob"]["gold_answered"]) == (0, 1)
    assert by_name["ann"]["gold_accuracy"] == 1.0 and by_name["bob"]["gold_accuracy"] == 0.0
    assert ann != bob


def test_admin_creates_prompts_and_tasks(db: Database, make_client: Client) -> None:
    client = make_client(db, overlap=3)
    _, admin = add_user(db, "root", "admin")
    prompt = client.post("/api/prompts", headers=bearer(admin), json={
        "content": [{"role": "user", "content": "Hello?"}], "dataset": "demo"})
    assert prompt.status_code == 201
    prompt_id = prompt.json()["prompt_id"]
    body = {"kind": "listwise", "prompt_id": prompt_id, "completions": ["x", "y", "z"],
            "gold": {"ranking": [2, 0, 1]}}
    created = client.post("/api/tasks", headers=bearer(admin), json=body)
    assert created.status_code == 201
    assert (created.json()["overlap"], created.json()["gold"], created.json()["created"]) == (
        3, True, True)
    again = client.post("/api/tasks", headers=bearer(admin), json=body)
    assert (again.json()["task_id"], again.json()["created"]) == (created.json()["task_id"],
                                                                   False)
    bad = [
        ({**body, "prompt_id": 12345}, 404),
        ({**body, "completions": ["x"]}, 422),
        ({**body, "gold": {"ranking": [0, 0, 1]}}, 422),
        ({**body, "gold": {"choice": "a"}}, 422),
        ({**body, "kind": "pairwise", "completions": ["x", "x"]}, 422),
        ({**body, "completions": ["x\x00"]}, 422),
    ]
    for payload, status in bad:
        response = client.post("/api/tasks", headers=bearer(admin), json=payload)
        assert response.status_code == status, (payload, response.text)
    assert client.post("/api/prompts", headers=bearer(admin),
                       json={"content": ""}).status_code == 422


def test_submit_rate_limit(db: Database, make_client: Client) -> None:
    client = make_client(db, submit_rate_per_s=0.001, submit_burst=2)
    _, token = add_user(db, "bob")
    task_id = add_task(db)
    client.get("/api/tasks/next", headers=bearer(token))
    codes = [_submit(client, token, task_id, {"choice": "a"}).status_code for _ in range(3)]
    assert codes == [201, 200, 429]


def test_queue_hints_are_rebuilt_and_self_correct(db: Database, make_client: Client) -> None:
    from store import assignment, repo
    from store.models import TaskQueueEntry

    client = make_client(db)
    ann, tok_a = add_user(db, "ann")
    imported = add_task(db, prompt="labelled at import")
    fresh = add_task(db, prompt="fresh", priority=-1)
    # A label that arrived outside the app (an import): the queue does not know about it.
    db.run_write(lambda s: repo.submit_label(session=s, task_id=imported, annotator_id=ann,
                                             value={"choice": "a"}))
    _, tok_b = add_user(db, "bob")
    got = client.get("/api/tasks/next", headers=bearer(tok_b)).json()["task"]
    assert got["task_id"] == fresh  # the stale hint was re-checked, skipped and corrected
    with db.read() as session:
        full = {e.task_id: e.full for e in session.exec(select(TaskQueueEntry))}
    assert full == {imported: True, fresh: True}
    db.run_write(lambda s: assignment.sync_queue(session=s, full=True))
    with db.read() as session:
        assert {e.task_id: e.full for e in session.exec(select(TaskQueueEntry))} == full
    # ann labelled one task and bob holds the other: nothing for ann.
    assert client.get("/api/tasks/next", headers=bearer(tok_a)).json()["task"] is None
