"""Authentication and authorisation: every route, no token, another annotator's token, revoked
and expired tokens, browser sessions (login, rate limit, cross-site requests), the UI mounts."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import select

from app import auth
from store import accounts
from store.db import Database
from store.models import ApiToken, Role, TaskKind, utcnow
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
    ids = {"task_id": two_annotators["labelled"], "label_id": two_annotators["label_id"],
           "model": "any-model"}  # the OpenAI-compatible routes (/v1/models/{model})
    routes = _routes(client)
    assert len(routes) >= 10
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic YW5uOng="}):
            response = _call(client, method, path, headers, ids)
            assert response.status_code == 401, (method, path, headers, response.text)
            message = "not authenticated: send 'Authorization: Bearer <token>' or log in"
            if path.startswith("/v1/"):
                # OpenAI's error shape on /v1 (so its clients raise AuthenticationError).
                assert response.json() == {"detail": message, "error": {
                    "message": message, "type": "invalid_request_error", "param": None,
                    "code": "invalid_api_key"}}
            else:
                assert response.json() == {"detail": message}


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
    from labeling.ui import mount_labeling_ui

    client = make_client(db, ui=mount_labeling_ui)
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


# ---------------------------------------------------------------------------------------------
# The in-process cache of verified tokens


def _count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = accounts.lookup_token

    def counting(**kwargs: Any) -> Any:
        calls.append(1)
        return real(**kwargs)

    monkeypatch.setattr(accounts, "lookup_token", counting)
    return calls


def test_a_verified_token_is_cached_and_a_revocation_here_ends_it_at_once(
        db: Database, make_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(db)
    ann, token = add_user(db, "ann")
    bob, other = add_user(db, "bob")
    lookups = _count_lookups(monkeypatch)
    for _ in range(5):
        assert client.get("/api/me", headers=bearer(token)).status_code == 200
    assert len(lookups) == 1  # one store lookup, then the cache
    with db.read() as session:  # the lookup still refreshed last_used_at
        row = session.exec(select(ApiToken).where(ApiToken.annotator_id == ann)).one()
        assert row.last_used_at is not None

    # Revoking someone else's token in this process drops every cached entry...
    assert client.get("/api/me", headers=bearer(other)).status_code == 200
    db.run_write(lambda s: accounts.revoke_tokens(session=s, annotator_id=bob))
    assert client.get("/api/me", headers=bearer(other)).status_code == 401
    # ...so ann's next request is checked again (and is still fine).
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    assert len(lookups) == 4
    db.run_write(lambda s: accounts.revoke_tokens(session=s, annotator_id=ann))
    assert client.get("/api/me", headers=bearer(token)).status_code == 401


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock, in seconds from now, for the token cache and the account checks."""
    offset = [0.0]
    base = utcnow()
    monkeypatch.setattr(auth, "_monotonic", lambda: 1000.0 + offset[0])
    for module in (auth, accounts):
        monkeypatch.setattr(module, "utcnow", lambda: base + timedelta(seconds=offset[0]))
    return offset


def test_a_change_by_another_process_takes_effect_within_the_cache_ttl(
        db: Database, make_client: Client, clock: list[float]) -> None:
    client = make_client(db)
    ann, token = add_user(db, "ann")
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    # A Core UPDATE, as `prefloop users revoke` in another process would be seen from here:
    # this process hears nothing of it, so the cached answer stands until its TTL ends.
    with db.engine.begin() as connection:
        connection.execute(update(ApiToken).where(ApiToken.annotator_id == ann)  # type: ignore[arg-type]
                           .values(revoked_at=utcnow()))
    clock[0] = auth.TOKEN_CACHE_TTL_S - 0.01
    assert client.get("/api/me", headers=bearer(token)).status_code == 200
    clock[0] = auth.TOKEN_CACHE_TTL_S
    assert client.get("/api/me", headers=bearer(token)).status_code == 401


def test_a_cached_token_still_expires_on_time(db: Database, make_client: Client,
                                              clock: list[float]) -> None:
    client = make_client(db)
    ann, _ = add_user(db, "ann")
    short, _ = db.run_write(lambda s: accounts.issue_token(
        session=s, annotator_id=ann, ttl=timedelta(seconds=2)))
    assert auth.TOKEN_CACHE_TTL_S > 2  # the token ends before its cache entry would
    assert client.get("/api/me", headers=bearer(short)).status_code == 200
    clock[0] = 1.99
    assert client.get("/api/me", headers=bearer(short)).status_code == 200
    clock[0] = 2.0
    assert client.get("/api/me", headers=bearer(short)).status_code == 401


def test_changes_epoch_moves_at_flush_and_after_commit_but_not_on_touch(db: Database) -> None:
    ann, _ = add_user(db, "ann")
    before = accounts.changes_epoch()
    token_id = db.run_write(lambda s: accounts.issue_token(
        session=s, annotator_id=ann, ttl=timedelta(hours=1)))[1].id
    assert accounts.changes_epoch() == before  # a new token changes no cached answer
    db.run_write(lambda s: accounts.touch_token(session=s, token_id=token_id))
    assert accounts.changes_epoch() == before  # bookkeeping, not a revocation
    with db.write() as session:
        accounts.revoke_token(session=session, token_id=token_id)
        at_flush = accounts.changes_epoch()
    # An answer read between the flush and the commit (the revocation not yet visible) carries
    # `at_flush` and is dropped by the second move.
    assert before < at_flush < accounts.changes_epoch()


def test_token_cache_entries_end_at_ttl_epoch_or_touch_time() -> None:
    cache = auth.TokenCache(ttl_s=5.0, max_entries=2)
    user = auth.User(id=1, name="ann", role=Role.annotator, token_id=1)
    epoch = accounts.changes_epoch()
    cache.put("a", auth._Cached(user, epoch, valid_until=10.0, last_used_stale_at=20.0))
    cache.put("b", auth._Cached(user, epoch, valid_until=20.0, last_used_stale_at=8.0))
    assert (cache.get("a", 9.0), cache.get("a", 10.0)) == (user, None)
    assert (cache.get("b", 7.9), cache.get("b", 8.0)) == (user, None)
    cache.put("c", auth._Cached(user, epoch - 1, valid_until=99.0, last_used_stale_at=99.0))
    assert cache.get("c", 1.0) is None  # from before a change made in this process
    for key in ("d", "e", "f"):  # full: cleared rather than grown without bound
        cache.put(key, auth._Cached(user, epoch, valid_until=99.0, last_used_stale_at=99.0))
    assert (cache.get("d", 1.0), cache.get("f", 1.0)) == (None, user)
