"""Authentication for every route: API tokens (`Authorization: Bearer`) and browser sessions.

A browser session is an ordinary API token (named "session", short-lived) carried in an
HttpOnly, SameSite=Strict cookie, issued by `POST /login` against the same accounts. Requests
authenticated by that cookie that change state must come from this site (Origin check), so
another site cannot make a logged-in browser submit labels. The Gradio UI uses the same check
through `user_from_request`, and its handlers call it again on every event.

Verified tokens are cached in the process for `TOKEN_CACHE_TTL_S`, so a busy annotator's
requests do not each pay a database round trip. The cache never outlives what it caches: an
entry ends at the token's expiry, and any token or account change made in this process (logout,
revocation, deactivation) drops every entry at once (`accounts.changes_epoch`). A change made by
another process (`prefloop users revoke`, another worker) takes effect within the TTL.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from app.annotation import User, write
from store import accounts
from store.db import Database
from store.models import utcnow

SESSION_COOKIE = "prefloop_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# How long a verified token is trusted without asking the store again (see the module docstring).
TOKEN_CACHE_TTL_S = 5.0
TOKEN_CACHE_MAX_ENTRIES = 10_000


def _monotonic() -> float:
    return time.monotonic()  # a seam for tests


@dataclass(frozen=True)
class _Cached:
    user: User
    epoch: int
    valid_until: float  # time.monotonic()
    last_used_stale_at: float  # _monotonic() when last_used_at needs a refresh


class TokenCache:
    """token hash -> the verified user, for a few seconds (only successful checks are kept)."""

    def __init__(self, ttl_s: float = TOKEN_CACHE_TTL_S,
                 max_entries: int = TOKEN_CACHE_MAX_ENTRIES):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def get(self, key: str, now: float) -> User | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (now >= entry.valid_until or now >= entry.last_used_stale_at
                or entry.epoch != accounts.changes_epoch()):
            with self._lock:
                self._entries.pop(key, None)
            return None
        return entry.user

    def put(self, key: str, entry: _Cached) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHES: weakref.WeakKeyDictionary[Database, TokenCache] = weakref.WeakKeyDictionary()
_CACHES_GUARD = threading.Lock()


def token_cache(db: Database) -> TokenCache:
    """The token cache of this store in this process."""
    cache = _CACHES.get(db)
    if cache is None:
        with _CACHES_GUARD:
            cache = _CACHES.setdefault(db, TokenCache())
    return cache


async def get_db(request: Request) -> Database:
    """The app's store (built by `create_app`, shared by all requests). Async, like
    `current_user`: FastAPI runs a sync dependency in the thread pool, and a hop to a worker
    thread and back costs more than the dependency itself."""
    db: Database = request.app.state.db
    return db


def bearer_token(connection: HTTPConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def cached_user(db: Database, token: str) -> User | None:
    """The account behind `token` if this process verified it moments ago (no I/O)."""
    if not token or len(token) > 200:
        return None
    return token_cache(db).get(accounts.hash_token(token), _monotonic())


def authenticate(db: Database, token: str) -> User | None:
    """The live account behind `token`, or None (unknown, revoked, expired, deactivated)."""
    if not token or len(token) > 200:
        return None
    key = accounts.hash_token(token)
    cache = token_cache(db)
    started = _monotonic()
    user = cache.get(key, started)
    if user is not None:
        return user
    # Read the epoch before the store: a change committed after this point drops the entry.
    epoch = accounts.changes_epoch()
    with db.engine.connect() as connection:
        live = accounts.lookup_token(connection=connection, token=token)
    if live is None:
        return None
    user = User(id=live.annotator_id, name=live.name, role=live.role, token_id=live.token_id)
    now = utcnow()
    if accounts.last_used_is_stale(live.last_used_at, now):
        write(db, lambda s: accounts.touch_token(session=s, token_id=live.token_id))
        last_used = now
    else:
        assert live.last_used_at is not None
        last_used = live.last_used_at
    until_expiry = (live.expires_at - now).total_seconds()
    until_touch = (last_used + accounts.LAST_USED_RESOLUTION - now).total_seconds()
    cache.put(key, _Cached(user=user, epoch=epoch,
                           valid_until=started + min(cache.ttl_s, until_expiry),
                           last_used_stale_at=started + until_touch))
    return user


def own_origin(connection: HTTPConnection, origin: str) -> bool:
    """Whether `origin` ("https://host[:port]") is this service's own (by the Host header)."""
    host = connection.headers.get("host", "")
    return bool(host) and origin in (f"http://{host}", f"https://{host}")


def same_origin(connection: HTTPConnection) -> bool:
    """Whether a state-changing browser request comes from this site: by Origin, else by the
    Referer's origin, else by Fetch metadata. A request with none of them is no browser's
    cross-site request (browsers send Origin on every cross-site POST)."""
    origin = connection.headers.get("origin")
    if origin is not None:
        return own_origin(connection, origin)
    referer = connection.headers.get("referer")
    if referer:
        scheme, sep, rest = referer.partition("://")
        return bool(sep) and own_origin(connection, f"{scheme}://{rest.split('/', 1)[0]}")
    return connection.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def request_token(connection: HTTPConnection) -> str | None:
    """The bearer token, else the session cookie (refused on a cross-site state change)."""
    token = bearer_token(connection)
    if token is not None:
        return token
    cookie = connection.cookies.get(SESSION_COOKIE)
    if cookie is None:
        return None
    method = connection.scope.get("method", "GET")
    if method not in SAFE_METHODS and not same_origin(connection):
        return None
    return cookie


def user_from_request(connection: HTTPConnection, db: Database) -> User | None:
    """The caller, by bearer token or session cookie; None when not authenticated."""
    token = request_token(connection)
    return None if token is None else authenticate(db, token)


def end_session(db: Database, token: str | None) -> None:
    """Revoke a browser session token (only a "session" token: never an API token that was
    put in the cookie by hand)."""
    if not token:
        return

    def revoke(session: object) -> None:
        row = accounts.find_token(session=session, token=token)  # type: ignore[arg-type]
        if row is not None and row.name == "session" and row.id is not None:
            accounts.revoke_token(session=session, token_id=row.id)  # type: ignore[arg-type]

    write(db, revoke)


async def current_user(request: Request, db: Annotated[Database, Depends(get_db)]) -> User:
    # On the event loop: a token verified moments ago costs a hash and a dict lookup; only a
    # cache miss goes to the store, in the thread pool.
    token = request_token(request)
    user = None
    if token is not None:
        user = cached_user(db, token) or await run_in_threadpool(authenticate, db, token)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "not authenticated: send "
                            "'Authorization: Bearer <token>' or log in",
                            headers={"WWW-Authenticate": "Bearer"})
    request.state.user = user
    return user


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin account")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
Store = Annotated[Database, Depends(get_db)]
