"""Authentication and authorisation: every route, no token, another annotator's token, revoked
and expired tokens, browser sessions (login, rate limit, cross-site requests), the UI mounts."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from store import accounts
from store.db import Database
from store.models import ApiToken, TaskKind
from tests.app.conftest import bearer
from tests.app.helpers import add_task, add_user

Client = Callable[..., TestClient]
PUBLIC = {("GET", "/healthz")}


def _routes(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path) for path, item in spec["paths"].items() for method in item]


def _bodies() -> dict[str, Any]:
    return {"/api/tasks/{task_id}/labels": {"choice": "a"},
            "/api/prompts": {"content": "hello"},
            "/api/tasks": {"kind": "binary", "prompt_id": 1, "completions": ["x"]}}


@pytest.fixture
def two_annotators(db: Database, make_client: Client) -> dict[str, Any]:
    """ann holds a task and a label; bob is another annotator; root is an admin."""
    client = make_client(db)
    ann, tok_a = add_user(db, "ann")
    _, tok_b = add_user(db, "bob")
    _, tok_admin = add_user(db, "root", "admin")
    labelled = add_task(db, prompt="labelled by ann")
    held = add_task(db, prompt="leased to ann")
    client.get("/api/tasks/next", headers=bearer(tok_a))
    label = client.post(f"/api/tasks/{labelled}/labels", json={"choice": "a"},
                        headers={**bearer(tok_a), "Idempotency-Key": "ann-1"}).json()
    assert client.get("/api/tasks/next", headers=bearer(tok_a)).json()["task"]["task_id"] == held
    return {"client": client, "ann": ann, "tok_a": tok_a, "tok_b": tok_b,
            "tok_admin": tok_admin, "labelled": labelled, "held": held,
            "label_id": label["label_id"]}


def _call(client: TestClient, method: str, path: str, headers: dict[str, str],
          ids: dict[str, int]) -> Any:
    url = re.sub(r"\{(\w+)\}", lambda m: str(ids[m.group(1)]), path)
    body = _bodies().get(path)
    return client.request(method, url, json=body, headers={**headers, "Idempotency-Key": "x"})


def test_every_route_needs_a_token(two_annotators: dict[str, Any]) -> None:
    client = two_annotators["client"]
    ids = {"task_id": two_annotators["labelled"], "label_id": two_annotators["label_id"]}
    routes = _routes(client)
    assert len(routes) >= 10
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic YW5uOng="}):
            response = _call(client, method, path, headers, ids)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json() == {"detail": "not authenticated: send 'Authorization: "
                                                 "Bearer <token>' or log in"}


def test_another_annotator_gets_nothing_of_anns(two_annotators: dict[str, Any]) -> None:
    t = two_annotators
    client, tok_b = t["client"], bearer(t["tok_b"])
    for task_id in (t["labelled"], t["held"]):
        response = client.post(f"/api/tasks/{task_id}/labels", json={"choice": "b"},
                               headers={**tok_b, "Idempotency-Key": "bob-1"})
        assert response.status_code == 404, response.text
        assert client.post(f"/api/tasks/{task_id}/skip", headers=tok_b).status_code == 404
    assert client.delete(f"/api/me/labels/{t['label_id']}", headers=tok_b).status_code == 404
    # ann's idempotency key, replayed by bob, finds nothing of ann's either.
    assert client.post(f"/api/tasks/{t['labelled']}/labels", json={"choice": "a"},
                       headers={**tok_b, "Idempotency-Key": "ann-1"}).status_code == 404
    mine = client.get("/api/me/labels", headers=tok_b).json()
    assert mine == {"labels": [], "total": 0}
    assert client.get("/api/me", headers=tok_b).json()["name"] == "bob"
    # Both of ann's tasks are taken (overlap 1): bob is offered neither.
    assert client.get("/api/tasks/next", headers=tok_b).json()["task"] is None
    for method, path in (("POST", "/api/prompts"), ("POST", "/api/tasks"),
                         ("GET", "/api/stats")):
        response = _call(client, method, path, tok_b, {})
        assert response.status_code == 403, (path, response.text)


def test_id_sweep_by_another_annotator_never_returns_data(
        two_annotators: dict[str, Any]) -> None:
    t = two_annotators
    client, tok_b = t["client"], bearer(t["tok_b"])
    for object_id in range(1, 8):
        label = client.post(f"/api/tasks/{object_id}/labels", json={"choice": "a"},
                            headers={**tok_b, "Idempotency-Key": f"sweep-{object_id}"})
        assert label.status_code == 404
        assert client.delete(f"/api/me/labels/{object_id}", headers=tok_b).status_code == 404
    with_a = t["client"].get("/api/me/labels", headers=bearer(t["tok_a"])).json()
    assert with_a["total"] == 1  # ann's label is still there, untouched


def test_revoked_expired_and_deactivated_tokens_are_refused(db: Database,
                                                            make_client: Client) -> None:
    client = make_client(db)
    ann, token = add_user(db, "ann")
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    with db.write() as session:
        row = session.exec(select(ApiToken).where(ApiToken.annotator_id == ann)).one()
        assert row.token_hash == accounts.hash_token(token) and token not in row.token_hash
        assert row.last_used_at is not None  # touched by the request above
    assert db.run_write(lambda s: accounts.revoke_tokens(session=s, annotator_id=ann)) == 1
    assert client.get("/api/me", headers=bearer(token)).status_code == 401

    short, _ = db.run_write(lambda s: accounts.issue_token(
        session=s, annotator_id=ann, ttl=timedelta(microseconds=1)))
    assert client.get("/api/me", headers=bearer(short)).status_code == 401

    fresh, _ = db.run_write(lambda s: accounts.issue_token(
        session=s, annotator_id=ann, ttl=timedelta(hours=1)))
    assert client.get("/api/me", headers=bearer(fresh)).status_code == 200

    def deactivate(session: Any) -> None:
        annotator = accounts.account_by_name(session=session, name="ann")
        annotator.active = False
        session.add(annotator)

    db.run_write(deactivate)
    assert client.get("/api/me", headers=bearer(fresh)).status_code == 401


def test_browser_session_login_logout_and_cross_site(db: Database,
                                                     make_client: Client) -> None:
    client = make_client(db)
    _, token = add_user(db, "ann")
    task_id = add_task(db, TaskKind.binary)
    login = client.post("/login", data={"name": "ann", "token": token, "next": "//evil.com"},
                        follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/label/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/api/me").json()["name"] == "ann"
    client.get("/api/tasks/next?kind=binary")
    cross = client.post(f"/api/tasks/{task_id}/labels", json={"value": "up"},
                        headers={"Idempotency-Key": "c1", "Origin": "https://evil.example"})
    assert cross.status_code == 401
    fetch_meta = client.post(f"/api/tasks/{task_id}/labels", json={"value": "up"},
                             headers={"Idempotency-Key": "c1", "Sec-Fetch-Site": "cross-site"})
    assert fetch_meta.status_code == 401
    same = client.post(f"/api/tasks/{task_id}/labels", json={"value": "up"},
                       headers={"Idempotency-Key": "c1", "Origin": "http://127.0.0.1"})
    assert same.status_code == 201
    assert client.post("/logout", follow_redirects=False).status_code == 303
    client.cookies.clear()
    client.cookies.set("prefloop_session", cookie.split(";")[0].split("=", 1)[1])
    assert client.get("/api/me").status_code == 401  # the session token was revoked
    assert client.get("/api/me", headers=bearer(token)).status_code == 200


def test_failed_logins_are_rate_limited(db: Database, make_client: Client) -> None:
    client = make_client(db, login_attempts=3)
    _, token = add_user(db, "ann")
    codes = [client.post("/login", data={"name": "ann", "token": f"wrong{i}"}).status_code
             for i in range(4)]
    assert codes == [401, 401, 401, 429]
    blocked = client.post("/login", data={"name": "ann", "token": token},
                          follow_redirects=False)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0


def test_ui_and_admin_mounts_need_a_session(db: Database, make_client: Client) -> None:
    client = make_client(db, with_ui=True)
    _, tok_a = add_user(db, "ann")
    _, tok_admin = add_user(db, "root", "admin")
    paths = ["/label/", "/label/config", "/label/gradio_api/info", "/admin/", "/admin/config",
             "/label/gradio_api/queue/data?session_hash=x"]
    for path in paths:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 401, path
        page = client.get(path, headers={"Accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
    for path in ("/label/gradio_api/queue/join", "/label/gradio_api/upload",
                 "/label/gradio_api/run/predict", "/admin/gradio_api/queue/join"):
        assert client.post(path, json={}).status_code == 401, path
    assert client.get("/admin/config", headers=bearer(tok_a)).status_code == 403
    assert client.get("/label/config", headers=bearer(tok_a)).status_code == 200
    assert client.get("/admin/config", headers=bearer(tok_admin)).status_code == 200


def test_cli_users_add_prints_token_last(tmp_path: Any, monkeypatch: Any) -> None:
    from typer.testing import CliRunner

    import cli

    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    added = runner.invoke(cli.app, ["users", "add", "ann", "--role", "admin"])
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    db = Database.from_url(f"sqlite:///{tmp_path / 'prefloop.db'}")
    with db.read() as session:
        row = accounts.find_token(session=session, token=token)
        assert row is not None
    assert runner.invoke(cli.app, ["users", "add", "ann"]).exit_code == 2
    assert runner.invoke(cli.app, ["users", "add", "x", "--role", "boss"]).exit_code == 2
    listed = runner.invoke(cli.app, ["users", "list"])
    assert "ann\tadmin\tactive\t1 live token(s)" in listed.output
    revoked = runner.invoke(cli.app, ["users", "revoke", "ann"])
    assert "revoked 1 token(s)" in revoked.output
    with db.read() as session:
        assert accounts.find_token(session=session, token=token) is None
    db.dispose()
