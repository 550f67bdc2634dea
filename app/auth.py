"""Authentication for every route: API tokens (`Authorization: Bearer`) and browser sessions.

A browser session is an ordinary API token (named "session", short-lived) carried in an
HttpOnly, SameSite=Strict cookie, issued by `POST /login` against the same accounts. Requests
authenticated by that cookie that change state must come from this site (Origin check), so
another site cannot make a logged-in browser submit labels. The Gradio UI uses the same check
through `user_from_request`, and its handlers call it again on every event.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.requests import HTTPConnection

from app.service import User, write
from store import accounts
from store.db import Database
from store.models import Role

SESSION_COOKIE = "prefloop_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_db(request: Request) -> Database:
    """The app's store (built by `create_app`, shared by all requests)."""
    db: Database = request.app.state.db
    return db


def bearer_token(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def authenticate(db: Database, token: str) -> User | None:
    """The live account behind `token`, or None (unknown, revoked, expired, deactivated)."""
    with db.read() as session:
        found = accounts.find_account(session=session, token=token)
        if found is None:
            return None
        row, annotator = found
        assert annotator.id is not None and row.id is not None and annotator.role is not None
        user = User(id=annotator.id, name=annotator.name, role=Role(annotator.role),
                    token_id=row.id)
        stale = accounts.needs_touch(row)
    if stale:
        write(db, lambda s: accounts.touch_token(session=s, token_id=user.token_id))
    return user


def same_origin(connection: HTTPConnection) -> bool:
    """Whether a state-changing browser request comes from this site."""
    origin = connection.headers.get("origin")
    if origin is None:
        # Browsers always send Origin on cross-site POSTs; fall back on Fetch metadata.
        return connection.headers.get("sec-fetch-site", "same-origin") in (
            "same-origin", "none")
    host = connection.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def user_from_request(connection: HTTPConnection, db: Database) -> User | None:
    """The caller, by bearer token or session cookie; None when not authenticated."""
    token = bearer_token(connection)
    if token is not None:
        return authenticate(db, token)
    cookie = connection.cookies.get(SESSION_COOKIE)
    if cookie is None:
        return None
    method = connection.scope.get("method", "GET")
    if method not in SAFE_METHODS and not same_origin(connection):
        return None
    return authenticate(db, cookie)


def current_user(request: Request, db: Annotated[Database, Depends(get_db)]) -> User:
    user = user_from_request(request, db)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not authenticated: send "
                            "'Authorization: Bearer <token>' or log in",
                            headers={"WWW-Authenticate": "Bearer"})
    request.state.user = user
    return user


def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin account")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
Store = Annotated[Database, Depends(get_db)]
