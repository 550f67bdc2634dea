"""Browser pages outside Gradio: the login form (which issues the session cookie) and logout.

Accounts are the API accounts: a person logs in with their account name and the token that
`prefloop users add` printed. Failed logins are limited per (account, client address) and per
client address (behind PREFLOOP_TRUSTED_PROXIES, the forwarded address); a login posted from
another site (Origin / Referer) is refused (login CSRF).
"""

from __future__ import annotations

import html
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.annotation import write
from app.auth import SESSION_COOKIE, Store, authenticate, end_session, same_origin
from app.web_security import client_address
from store import accounts

router = APIRouter(include_in_schema=False)

SAFE_NEXT = ("/label", "/admin")

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefloop · log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f7f9; display: grid;
       place-items: center; min-height: 100vh; margin: 0; }}
form {{ background: #fff; padding: 2rem; border-radius: 8px; width: 22rem;
       box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
label {{ display: block; margin-top: 1rem; font-size: .9rem; }}
input {{ width: 100%; padding: .5rem; box-sizing: border-box; margin-top: .25rem; }}
button {{ margin-top: 1.5rem; width: 100%; padding: .6rem; }}
.error {{ color: #b00020; margin-top: 1rem; }}
</style></head>
<body><form method="post" action="/login">
<h1>prefloop</h1>
<p>Log in with your account name and the token you were given.</p>
<label>Account <input name="name" id="name" autocomplete="username" required autofocus></label>
<label>Token <input name="token" id="token" type="password" autocomplete="current-password"
 required></label>
<input type="hidden" name="next" value="{next}">
<button type="submit" id="login">Log in</button>
{error}
</form></body></html>"""


def _safe_next(target: str | None) -> str:
    if target and target.startswith(SAFE_NEXT) and "//" not in target and "\\" not in target:
        return target
    return "/label/"


def _page(next_path: str, error: str | None, status_code: int) -> HTMLResponse:
    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = LOGIN_PAGE.format(next=html.escape(next_path, quote=True), error=error_html)
    return HTMLResponse(body, status_code=status_code)


@router.get("/login")
def login_page(next: str | None = None) -> HTMLResponse:
    """The login form."""
    return _page(_safe_next(next), None, 200)


@router.post("/login")
def login(request: Request, db: Store, name: Annotated[str, Form(max_length=200)],
          token: Annotated[str, Form(max_length=200)],
          next: Annotated[str | None, Form(max_length=500)] = None) -> Response:
    """Check name + token, then set a short-lived session cookie and go to the UI."""
    if not same_origin(request):
        # Login CSRF: another site must not log a browser in to an account of its choosing.
        return _page(_safe_next(next), "This login form was sent from another site.", 403)
    settings = request.app.state.settings
    client = client_address(request, settings.trusted_networks())
    # Failures count per (account, address) and per address: someone failing for "ann" from
    # one address locks out that address, never ann herself from everywhere else.
    pair = f"account:{name.strip().lower()}@{client}"
    address = f"ip:{client}"
    wait = max(request.app.state.login_limiter.blocked_for(pair),
               request.app.state.address_limiter.blocked_for(address))
    if wait > 0:
        blocked = _page(_safe_next(next), "Too many failed attempts; try again later.", 429)
        blocked.headers["Retry-After"] = str(max(1, round(wait)))
        return blocked
    user = authenticate(db, token)
    if user is None or user.name != name.strip():
        request.app.state.login_limiter.record_failure(pair)
        request.app.state.address_limiter.record_failure(address)
        return _page(_safe_next(next), "Unknown account or token.", 401)
    ttl = timedelta(hours=settings.session_ttl_hours)
    session_token, _ = write(db, lambda s: accounts.issue_token(
        session=s, annotator_id=user.id, ttl=ttl, name="session"))
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, session_token, max_age=int(ttl.total_seconds()),
                        httponly=True, samesite="strict", secure=settings.secure_cookies,
                        path="/")
    return response


def logged_out() -> Response:
    """To the login page, with the session cookie gone."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, db: Store) -> Response:
    """End the browser session (its token is revoked, not just forgotten)."""
    end_session(db, request.cookies.get(SESSION_COOKIE))
    return logged_out()
