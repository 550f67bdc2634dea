"""Which policy version serves: the write path for registering, promoting, rejecting and
rolling back policy versions, with an audit event for every status change.

The deployed policy is the one `PolicyVersion` with status "deployed". Each function takes the
session and never commits, like store/repo.py: the caller runs it in one write transaction, so
"retire the old, deploy the new, write both audit events" happens entirely or not at all.

    with db.write() as session:
        v2 = register_policy(session, name="round-2", base_model="smollm2-135m-instruct",
                             weights_uri="runs/round-2/model", parent_id=v1.id)
    with db.write() as session:
        promote(session, policy_id=v2.id, actor="round:2")
    with db.write() as session:
        rollback(session, actor="ana")          # back to v1

Audit rows: entity "policy_version", the row's id, action register | promote | retire | reject |
rollback, `old`/`new` = {"status": ...} plus, in `new`, the actor, a reason where there is one,
and `previous_id` on the row that became deployed (the version it replaced). `rollback` follows
`previous_id` back, so rolling back twice goes back two deployments, skipping rejected rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from store import repo
from store.errors import Conflict, InvalidInput, NotFound
from store.models import Annotator, AuditEvent, PolicyStatus, PolicyVersion

AUDIT_ENTITY = "policy_version"
MAX_REASON_CHARS = 2_000


@dataclass(frozen=True)
class PolicyEvent:
    """One status change of a policy version, as the audit trail recorded it."""

    policy_id: int
    action: str
    old_status: str | None
    new_status: str | None
    actor: str | None
    reason: str | None
    previous_id: int | None
    at: datetime


def register_policy(session: Session, *, name: str, base_model: str, weights_uri: str,
                    parent_id: int | None = None, round_id: int | None = None) -> PolicyVersion:
    """A new candidate version; `weights_uri` is a full Hugging Face model folder (or the
    model name an upstream server knows it by). A taken name is a Conflict."""
    name, base_model, weights_uri = name.strip(), base_model.strip(), weights_uri.strip()
    if not name or not base_model or not weights_uri:
        raise InvalidInput("a policy version needs a name, a base_model and a weights_uri")
    if name.isdigit():
        # `prefloop deploy VERSION` reads digits as an id; a numeric name would be ambiguous.
        raise InvalidInput(f"a policy version name cannot be all digits ({name!r})")
    policy = repo.create_policy_version(session=session, name=name, base_model=base_model,
                                        weights_uri=weights_uri, parent_id=parent_id,
                                        round_id=round_id, status=PolicyStatus.candidate)
    _audit(session, policy, "register", old=None, actor=None)
    return policy


def promote(session: Session, *, policy_id: int, actor: str) -> PolicyVersion:
    """Deploy `policy_id`: whichever version was deployed is retired. Promoting the deployed
    version again changes nothing (so a resumed round can call this twice); a rejected one is
    refused (register it again under a new name to override the gate)."""
    versions = _lock_versions(session)
    policy = _get(versions, policy_id)
    if policy.status == PolicyStatus.deployed:
        return policy
    if policy.status == PolicyStatus.rejected:
        reason = last_reason(session, policy_id=policy_id)
        raise Conflict(f"policy version {policy.name!r} was rejected"
                       + (f" ({reason})" if reason else "") + "; it cannot be deployed")
    current = _deployed_of(versions)
    for other in current:
        _set_status(session, other, PolicyStatus.retired, "retire", actor=actor,
                    reason=f"replaced by {policy.name!r}")
    _set_status(session, policy, PolicyStatus.deployed, "promote", actor=actor,
                previous_id=current[0].id if current else None)
    return policy


def reject(session: Session, *, policy_id: int, actor: str, reason: str) -> PolicyVersion:
    """Mark a version as never to be served, with the reason (a failed gate, a failed smoke
    generation). Rejecting the deployed version also puts its predecessor back in service, so
    the database keeps naming what actually serves. Rejecting twice changes nothing."""
    reason = reason.strip()[:MAX_REASON_CHARS]
    if not reason:
        raise InvalidInput("a rejection needs a reason")
    versions = _lock_versions(session)
    policy = _get(versions, policy_id)
    if policy.status == PolicyStatus.rejected:
        return policy
    was_deployed = policy.status == PolicyStatus.deployed
    _set_status(session, policy, PolicyStatus.rejected, "reject", actor=actor, reason=reason)
    if was_deployed:
        restored = _previous_servable(session, versions, policy)
        if restored is not None:
            _set_status(session, restored, PolicyStatus.deployed, "rollback", actor=actor,
                        reason=f"{policy.name!r} rejected: {reason}",
                        previous_id=_previous_id(session, restored))
    return policy


def rollback(session: Session, *, actor: str) -> PolicyVersion:
    """Put the version deployed before the current one back in service; the current one is
    retired. Returns the version now deployed. Conflict when there is nothing to go back to."""
    versions = _lock_versions(session)
    current = _deployed_of(versions)
    if not current:
        raise Conflict("no policy version is deployed: nothing to roll back")
    restored = _previous_servable(session, versions, current[0])
    if restored is None:
        raise Conflict(f"{current[0].name!r} has no earlier deployed version to roll back to")
    for other in current:
        _set_status(session, other, PolicyStatus.retired, "retire", actor=actor,
                    reason=f"rolled back to {restored.name!r}")
    # The restored row's own predecessor, so a second rollback goes one further back.
    _set_status(session, restored, PolicyStatus.deployed, "rollback", actor=actor,
                previous_id=_previous_id(session, restored))
    return restored


def deployed(session: Session) -> PolicyVersion | None:
    """The version that serves, or None before the first deployment."""
    return session.exec(
        select(PolicyVersion).where(PolicyVersion.status == PolicyStatus.deployed)
        .order_by(col(PolicyVersion.id).desc())
    ).first()


def find_policy(session: Session, ref: str) -> PolicyVersion:
    """A version by id (all digits) or by name."""
    ref = ref.strip()
    policy = (session.get(PolicyVersion, int(ref)) if ref.isdigit() else session.exec(
        select(PolicyVersion).where(PolicyVersion.name == ref)).first())
    if policy is None:
        raise NotFound(f"no policy version {ref!r} (give its id or its name)")
    return policy


def history(session: Session, *, policy_id: int | None = None, limit: int = 50
            ) -> list[PolicyEvent]:
    """Status changes, newest first (of one version, or of all)."""
    query = select(AuditEvent).where(AuditEvent.entity == AUDIT_ENTITY)
    if policy_id is not None:
        query = query.where(AuditEvent.entity_id == policy_id)
    rows = session.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all()
    return [_event(row) for row in rows]


def last_reason(session: Session, *, policy_id: int) -> str | None:
    """Why the version was last rejected or retired, if the trail says."""
    for event in history(session, policy_id=policy_id, limit=20):
        if event.action in ("reject", "retire") and event.reason:
            return event.reason
    return None


# ---------------------------------------------------------------------------------------------


def _lock_versions(session: Session) -> list[PolicyVersion]:
    """All versions, locked for this transaction. SQLite's BEGIN IMMEDIATE already serialises
    writers; on PostgreSQL two concurrent promotes would otherwise each retire the row they saw
    and leave two deployed. Policy versions are few, so locking them all is cheap."""
    query = select(PolicyVersion).order_by(col(PolicyVersion.id))
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()
    return list(session.exec(query.execution_options(populate_existing=True)).all())


def _get(versions: list[PolicyVersion], policy_id: int) -> PolicyVersion:
    for policy in versions:
        if policy.id == policy_id:
            return policy
    raise NotFound(f"policy version {policy_id} does not exist")


def _deployed_of(versions: list[PolicyVersion]) -> list[PolicyVersion]:
    # Newest first; normally one, but rows written around this module may leave more.
    return sorted((p for p in versions if p.status == PolicyStatus.deployed),
                  key=lambda p: p.id or 0, reverse=True)


def _previous_id(session: Session, policy: PolicyVersion) -> int | None:
    """The version `policy` replaced when it was last made deployed: from the audit trail, or,
    for rows deployed without one (set directly through repo), its training parent."""
    event = session.exec(
        select(AuditEvent).where(AuditEvent.entity == AUDIT_ENTITY,
                                 AuditEvent.entity_id == policy.id,
                                 col(AuditEvent.action).in_(("promote", "rollback")))
        .order_by(col(AuditEvent.id).desc())
    ).first()
    if event is not None:
        previous = (event.new or {}).get("previous_id")
        return int(previous) if previous is not None else None
    return policy.parent_id


def _previous_servable(session: Session, versions: list[PolicyVersion],
                       policy: PolicyVersion) -> PolicyVersion | None:
    """Walk `previous_id` back from `policy` to the first version not rejected."""
    seen = {policy.id}
    previous_id = _previous_id(session, policy)
    while previous_id is not None and previous_id not in seen:
        seen.add(previous_id)
        candidate = next((p for p in versions if p.id == previous_id), None)
        if candidate is None:
            return None
        if candidate.status != PolicyStatus.rejected and candidate.weights_uri:
            return candidate
        previous_id = _previous_id(session, candidate)
    return None


def _set_status(session: Session, policy: PolicyVersion, status: PolicyStatus, action: str, *,
                actor: str, reason: str | None = None, previous_id: int | None = None) -> None:
    old = policy.status
    policy.status = status
    session.add(policy)
    session.flush()
    _audit(session, policy, action, old=old, actor=actor, reason=reason, previous_id=previous_id)


def _audit(session: Session, policy: PolicyVersion, action: str, *, old: PolicyStatus | None,
           actor: str | None, reason: str | None = None, previous_id: int | None = None) -> None:
    assert policy.id is not None
    new: dict[str, Any] = {"status": policy.status.value, "name": policy.name}
    if actor is not None:
        new["actor"] = actor
    if reason is not None:
        new["reason"] = reason
    if action in ("promote", "rollback"):
        new["previous_id"] = previous_id
    if action == "register":
        new.update(base_model=policy.base_model, weights_uri=policy.weights_uri,
                   parent_id=policy.parent_id, round_id=policy.round_id)
    session.add(AuditEvent(entity=AUDIT_ENTITY, entity_id=policy.id, action=action,
                           actor_id=_account_id(session, actor),
                           old={"status": old.value} if old is not None else None, new=new))
    session.flush()


def _account_id(session: Session, actor: str | None) -> int | None:
    """The annotator row when the actor is an account or judge name; None for "round:3",
    "serving" and the like (the name is kept in the event either way)."""
    if not actor:
        return None
    return session.exec(select(Annotator.id).where(Annotator.name == actor)).first()


def _event(row: AuditEvent) -> PolicyEvent:
    new, old = row.new or {}, row.old or {}
    previous = new.get("previous_id")
    return PolicyEvent(policy_id=row.entity_id, action=row.action, old_status=old.get("status"),
                       new_status=new.get("status"), actor=new.get("actor"),
                       reason=new.get("reason"),
                       previous_id=int(previous) if previous is not None else None, at=row.at)
