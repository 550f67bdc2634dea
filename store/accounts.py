"""Accounts and API tokens: create a person's account, issue, verify, revoke and expire tokens.

A token is 32 random bytes (URL-safe base64) shown once; the store keeps only its sha256, so a
leaked database does not leak usable tokens. Every function takes `*, session` like store/repo.py
and never commits.

`lookup_token` is the web app's per-request check: one Core SELECT, no ORM objects. Callers that
cache its answer (app/auth.py) watch `changes_epoch()`: it moves whenever this process changes a
token or an account through the ORM (revocation, deactivation), once at the flush and once more
after the commit, so a cached answer never outlives an in-process revocation.

    with db.write() as session:
        annotator, token = create_account(session=session, name="ana", role=Role.annotator)
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, update
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import object_session
from sqlmodel import Session, col, select

from store import repo
from store.errors import Conflict, InvalidInput, NotFound
from store.models import Annotator, AnnotatorKind, ApiToken, Role, utcnow
from store.values import sha256_hex

TOKEN_BYTES = 32
# last_used_at is refreshed at most this often, so verifying a token stays a read most times.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    return sha256_hex(token)


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive (they were stored as UTC).
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def create_account(*, session: Session, name: str, role: Role,
                   token_ttl: timedelta = timedelta(days=90)) -> tuple[Annotator, str]:
    """A new human account with its first API token; an existing name is refused."""
    name = name.strip()
    if session.exec(select(Annotator).where(Annotator.name == name)).first() is not None:
        raise Conflict(f"an account named {name!r} already exists")
    annotator = repo.get_or_create_annotator(session=session, name=name,
                                             kind=AnnotatorKind.human, role=Role(role))
    token, _ = issue_token(session=session, annotator_id=_id(annotator), ttl=token_ttl,
                           name="cli")
    return annotator, token


def _id(annotator: Annotator) -> int:
    assert annotator.id is not None
    return annotator.id


def issue_token(*, session: Session, annotator_id: int, ttl: timedelta,
                name: str | None = None) -> tuple[str, ApiToken]:
    """A fresh token for a human account (returned once, in clear) and its stored row."""
    annotator = session.get(Annotator, annotator_id)
    if annotator is None:
        raise NotFound(f"annotator {annotator_id} does not exist")
    if annotator.kind != AnnotatorKind.human or annotator.role is None:
        raise InvalidInput("only human accounts (annotators and admins) get API tokens")
    if ttl <= timedelta(0):
        raise InvalidInput("a token's lifetime must be positive")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    row = ApiToken(annotator_id=annotator_id, token_hash=hash_token(token), name=name,
                   expires_at=utcnow() + ttl)
    session.add(row)
    session.flush()
    return token, row


def find_account(*, session: Session, token: str, now: datetime | None = None
                 ) -> tuple[ApiToken, Annotator] | None:
    """The live token row for `token` and its account, in one query: the token exists, is not
    revoked, not expired, and its account is an active human one. Anything else is None
    (callers answer 401 without saying which)."""
    if not token or len(token) > 200:
        return None
    found = session.exec(
        select(ApiToken, Annotator)
        .join(Annotator, col(Annotator.id) == col(ApiToken.annotator_id))
        .where(ApiToken.token_hash == hash_token(token))
    ).first()
    if found is None:
        return None
    row, annotator = found
    now = now or utcnow()
    if row.revoked_at is not None or _aware(row.expires_at) <= now:
        return None
    if not annotator.active or annotator.role is None:
        return None
    return row, annotator


def find_token(*, session: Session, token: str, now: datetime | None = None) -> ApiToken | None:
    """The live token row for `token` (see `find_account`), or None."""
    found = find_account(session=session, token=token, now=now)
    return found[0] if found else None


def needs_touch(row: ApiToken, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return row.last_used_at is None or now - _aware(row.last_used_at) > LAST_USED_RESOLUTION


def touch_token(*, session: Session, token_id: int) -> None:
    # A Core UPDATE: last_used_at is bookkeeping, not a change that must invalidate cached
    # authentications (the ORM events below would).
    session.connection().execute(update(ApiToken).where(col(ApiToken.id) == token_id)
                                 .values(last_used_at=utcnow()))


def revoke_token(*, session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.flush()
    return row


def revoke_tokens(*, session: Session, annotator_id: int) -> int:
    """Revoke every live token of an account; returns how many were revoked."""
    rows = session.exec(
        select(ApiToken).where(ApiToken.annotator_id == annotator_id,
                               col(ApiToken.revoked_at).is_(None))
    ).all()
    now = utcnow()
    for row in rows:
        row.revoked_at = now
        session.add(row)
    session.flush()
    return len(rows)


def account_by_name(*, session: Session, name: str) -> Annotator:
    annotator = session.exec(select(Annotator).where(Annotator.name == name)).first()
    if annotator is None or annotator.kind != AnnotatorKind.human:
        raise NotFound(f"no account named {name!r}")
    return annotator


def list_accounts(*, session: Session) -> list[tuple[Annotator, int]]:
    """Human accounts with their number of live tokens."""
    accounts = session.exec(
        select(Annotator).where(Annotator.kind == AnnotatorKind.human).order_by(col(Annotator.id))
    ).all()
    now = utcnow()
    out = []
    for annotator in accounts:
        tokens = session.exec(select(ApiToken).where(
            ApiToken.annotator_id == annotator.id, col(ApiToken.revoked_at).is_(None))).all()
        out.append((annotator, sum(1 for t in tokens if _aware(t.expires_at) > now)))
    return out


# ---------------------------------------------------------------------------------------------
# The per-request check, and the signal that cached answers must be dropped


@dataclass(frozen=True)
class LiveToken:
    """A live token and its account, as the web app needs them on every request."""

    token_id: int
    annotator_id: int
    name: str
    role: Role
    expires_at: datetime  # aware UTC
    last_used_at: datetime | None  # aware UTC


_TOKEN_COLUMNS = (col(ApiToken.id), col(ApiToken.annotator_id), col(Annotator.name),
                  col(Annotator.role), col(ApiToken.expires_at), col(ApiToken.last_used_at),
                  col(ApiToken.revoked_at), col(Annotator.active), col(Annotator.kind))
_LOOKUP = (sa_select(*_TOKEN_COLUMNS)
           .join(Annotator, col(Annotator.id) == col(ApiToken.annotator_id)))


def lookup_token(*, connection: Connection, token: str, now: datetime | None = None
                 ) -> LiveToken | None:
    """`find_account` in one Core statement: the live token and account, or None."""
    if not token or len(token) > 200:
        return None
    row = connection.execute(
        _LOOKUP.where(col(ApiToken.token_hash) == hash_token(token))).first()
    if row is None:
        return None
    token_id, annotator_id, name, role, expires, last_used, revoked, active, kind = row
    now = now or utcnow()
    expires = _aware(expires)
    if revoked is not None or expires <= now:
        return None
    if not active or role is None or kind != AnnotatorKind.human:
        return None
    assert token_id is not None  # a primary key
    return LiveToken(token_id=token_id, annotator_id=annotator_id, name=name, role=Role(role),
                     expires_at=expires,
                     last_used_at=_aware(last_used) if last_used is not None else None)


def last_used_is_stale(last_used_at: datetime | None, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION


_epoch_lock = threading.Lock()
_epoch = 0


def changes_epoch() -> int:
    """A number that moves whenever this process changes a token or account row (ORM)."""
    return _epoch


def _bump(*_args: Any) -> None:
    global _epoch
    with _epoch_lock:
        _epoch += 1


def _on_change(_mapper: Any, _connection: Any, target: Any) -> None:
    # Once now (the flush) and once after the commit: an answer looked up between the two
    # (before the change was visible) is then dropped as well.
    _bump()
    session = object_session(target)
    if session is not None:
        event.listen(session, "after_commit", _bump, once=True)


for _model in (ApiToken, Annotator):
    for _when in ("after_update", "after_delete"):
        event.listen(_model, _when, _on_change)
