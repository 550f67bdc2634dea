"""The security review's findings, each over real HTTP against a live server: login lockout
per (account, address), X-Forwarded-For only from trusted proxies, login CSRF, Gradio's CORS,
the Content-Security-Policy on every page, no CDN scripts, Gradio's logout, uploads and
monitoring off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import select

from app.main import create_app
from app.web_security import DATA_POLICY
from labeling.ui import mount_labeling_ui
from store.db import Database
from store.models import ApiToken
from tests.app.helpers import add_user, live_server

PAGE_POLICY = re.compile(
    r"default-src 'self'; script-src 'self' 'nonce-(?P<nonce>[A-Za-z0-9_-]{24})'"
    r"(?P<rest>[^;]*); style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    r"font-src 'self' data:; connect-src 'self'; media-src 'self' data: blob:; "
    r"worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "
    r"frame-ancestors 'none'$")


@pytest.fixture
def site(sqlite_db: Database, tmp_path: Any) -> Iterator[Any]:
    """start(**settings) -> the base URL of a live app with the labeling UI."""
    from app.settings import Settings

    stack: list[Any] = []

    def start(**overrides: Any) -> str:
        settings = Settings(data_dir=tmp_path, serving="off", **overrides)
        context = live_server(create_app(settings, db=sqlite_db, ui=mount_labeling_ui))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def _login(base: str, name: str, token: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{base}/login", data={"name": name, "token": token}, headers=headers)


def _sessions(db: Database) -> list[ApiToken]:
    with db.read() as session:
        return list(session.exec(select(ApiToken).where(ApiToken.name == "session")).all())


# -- login limits -------------------------------------------------------------------------


def test_failures_from_one_address_do_not_lock_the_user_out_elsewhere(
        site: Any, sqlite_db: Database) -> None:
    base = site(login_attempts=3, login_attempts_per_address=5, trusted_proxies="127.0.0.1")
    _, ann = add_user(sqlite_db, "ann")
    _, bob = add_user(sqlite_db, "bob")
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    codes = [_login(base, "ann", f"wrong-{i}", **attacker).status_code for i in range(4)]
    assert codes == [401, 401, 401, 429]
    assert _login(base, "ann", ann, **attacker).status_code == 429  # the offender only
    # ann herself, from her own address, logs in at once.
    home = _login(base, "ann", ann, **{"X-Forwarded-For": "198.51.100.7"})
    assert (home.status_code, home.headers["location"]) == (303, "/label/")
    # The attacker's address has 2 of its 5 left, for any account; then it is blocked.
    assert [_login(base, "bob", "wrong", **attacker).status_code for _ in range(3)] == [
        401, 401, 429]
    blocked = _login(base, "bob", bob, **attacker)
    assert (blocked.status_code, "Too many failed attempts" in blocked.text) == (429, True)
    assert _login(base, "bob", bob, **{"X-Forwarded-For": "198.51.100.8"}).status_code == 303
    assert len(_sessions(sqlite_db)) == 2


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
        site: Any, sqlite_db: Database) -> None:
    base = site(login_attempts=3)  # no trusted proxies: the peer address is the client
    _, ann = add_user(sqlite_db, "ann")
    codes = [_login(base, "ann", "wrong", **{"X-Forwarded-For": f"203.0.113.{i}"}).status_code
             for i in range(4)]
    assert codes == [401, 401, 401, 429]  # rotating the header does not reset the count
    assert _login(base, "ann", ann, **{"X-Forwarded-For": "198.51.100.7"}).status_code == 429
    # A proxy that is trusted: the right-most untrusted hop is the client, not the left-most.
    proxied = site(login_attempts=3, trusted_proxies="127.0.0.0/8, 10.0.0.0/8")
    spoof = {"X-Forwarded-For": "1.2.3.4, 203.0.113.50, 10.1.1.1"}
    assert [_login(proxied, "ann", "bad", **spoof).status_code for _ in range(4)] == [
        401, 401, 401, 429]
    same_client = {"X-Forwarded-For": "9.9.9.9, 203.0.113.50"}
    assert _login(proxied, "ann", ann, **same_client).status_code == 429
    assert _login(proxied, "ann", ann, **{"X-Forwarded-For": "203.0.113.51"}).status_code == 303


def test_a_bad_trusted_proxies_setting_names_the_entry() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match=r"'10\.0\.0\.300' is not an IP address or network"):
        Settings(trusted_proxies="127.0.0.1, 10.0.0.300")


# -- login CSRF ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1.evil.example"},
    {"Referer": "https://evil.example/attack.html"},
    {"Sec-Fetch-Site": "cross-site"},
])
def test_login_posted_from_another_site_is_403_and_issues_nothing(
        site: Any, sqlite_db: Database, headers: dict[str, str]) -> None:
    base = site()
    _, ann = add_user(sqlite_db, "ann")
    response = _login(base, "ann", ann, **headers)
    assert response.status_code == 403
    assert "This login form was sent from another site." in response.text
    assert "set-cookie" not in response.headers
    assert _sessions(sqlite_db) == []


def test_login_from_this_site_works(site: Any, sqlite_db: Database) -> None:
    base = site()
    _, ann = add_user(sqlite_db, "ann")
    for headers in ({"Origin": base}, {"Referer": f"{base}/login?next=/label/"}, {}):
        assert _login(base, "ann", ann, **headers).status_code == 303, headers
    assert len(_sessions(sqlite_db)) == 3


# -- CORS -------------------------------------------------------------------------------------


def test_gradio_does_not_reflect_another_origin_behind_a_public_host(
        site: Any, sqlite_db: Database) -> None:
    base = site()
    _, ann = add_user(sqlite_db, "ann")
    public = {"Host": "label.example.org", "Origin": "https://evil.example",
              "Authorization": f"Bearer {ann}"}
    for path in ("/label/config", "/label/gradio_api/info", "/api/me"):
        response = httpx.get(f"{base}{path}", headers=public)
        assert response.status_code == 200, path
        assert "access-control-allow-origin" not in response.headers, path
        assert "access-control-allow-credentials" not in response.headers, path
    preflight = httpx.options(f"{base}/label/gradio_api/queue/join", headers={
        **public, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 400


# -- Content-Security-Policy and /docs ---------------------------------------------------------


def test_every_page_and_error_carries_a_content_security_policy(
        site: Any, sqlite_db: Database) -> None:
    base = site()
    _, root = add_user(sqlite_db, "root", "admin")
    auth = {"Authorization": f"Bearer {root}", "Accept": "text/html"}
    login = httpx.get(f"{base}/login")
    policy = PAGE_POLICY.match(login.headers["content-security-policy"])
    assert policy is not None and policy["rest"] == ""  # no eval, no hashes on /login
    for path in ("/label/", "/admin/"):
        page = httpx.get(f"{base}{path}", headers=auth)
        assert page.status_code == 200
        policy = PAGE_POLICY.match(page.headers["content-security-policy"])
        assert policy is not None, page.headers["content-security-policy"]
        assert policy["rest"].endswith(" 'unsafe-eval'")
        tags = re.findall(r"<script[^>]*>", page.text)
        assert tags and all(f'nonce="{policy["nonce"]}"' in tag for tag in tags), tags
        again = httpx.get(f"{base}{path}", headers=auth).headers["content-security-policy"]
        assert PAGE_POLICY.match(again)["nonce"] != policy["nonce"]  # type: ignore[index]
    for path, status in (("/api/me", 401), ("/docs", 404), ("/redoc", 404), ("/nope", 404),
                         ("/healthz", 200), ("/label/config", 401)):
        response = httpx.get(f"{base}{path}")
        assert (response.status_code, response.headers["content-security-policy"]) == (
            status, DATA_POLICY), path


def test_no_page_loads_scripts_from_another_host(site: Any, sqlite_db: Database) -> None:
    base = site()
    _, root = add_user(sqlite_db, "root", "admin")
    auth = {"Authorization": f"Bearer {root}", "Accept": "text/html"}
    assert httpx.get(f"{base}/openapi.json").status_code == 200  # the schema is still served
    for path in ("/login", "/label/", "/admin/", "/docs", "/redoc"):
        page = httpx.get(f"{base}{path}", headers=auth)
        sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", page.text)
        assert all(not s.startswith(("http:", "https:", "//")) for s in sources), sources
        assert "cdn.jsdelivr.net" not in page.text, path


# -- Gradio: logout, uploads, monitoring -----------------------------------------------------


def test_gradio_logout_ends_the_prefloop_session(site: Any, sqlite_db: Database) -> None:
    base = site()
    _, ann = add_user(sqlite_db, "ann")
    with httpx.Client(base_url=base) as browser:
        assert browser.post("/login", data={"name": "ann", "token": ann}).status_code == 303
        cookie = browser.cookies["prefloop_session"]
        assert browser.get("/api/me").json()["name"] == "ann"
        out = browser.get("/label/logout")
        assert (out.status_code, out.headers["location"]) == (303, "/login")
        assert 'prefloop_session=""' in out.headers["set-cookie"]
    [session] = _sessions(sqlite_db)
    assert session.revoked_at is not None
    replay = httpx.get(f"{base}/api/me", cookies={"prefloop_session": cookie})
    assert replay.status_code == 401
    page = httpx.get(f"{base}/label/", cookies={"prefloop_session": cookie},
                     headers={"Accept": "text/html"})
    assert (page.status_code, page.headers["location"]) == (303, "/login?next=/label/")


@pytest.mark.parametrize("role", ["annotator", "admin"])
def test_uploads_monitoring_and_file_serving_are_off(site: Any, sqlite_db: Database,
                                                     role: str) -> None:
    base = site()
    _, token = add_user(sqlite_db, f"user-{role}", role)
    auth = {"Authorization": f"Bearer {token}"}
    upload = httpx.post(f"{base}/label/gradio_api/upload", headers=auth,
                        files={"files": ("big.bin", b"x" * 4096)})
    assert (upload.status_code, upload.json()) == (404, {"detail": "not available here"})
    for path in ("/label/monitoring/summary", "/label/monitoring", "/admin/monitoring/summary",
                 "/label/gradio_api/upload_progress?upload_id=x",
                 "/label/gradio_api/file=/etc/passwd", "/label/gradio_api/token",
                 "/label/gradio_api/vibe-code"):
        if role == "annotator" and path.startswith("/admin"):
            continue
        response = httpx.get(f"{base}{path}", headers=auth)
        assert response.status_code == 404, (path, response.text)
    # What the UI does use still works.
    assert httpx.get(f"{base}/label/config", headers=auth).status_code == 200
