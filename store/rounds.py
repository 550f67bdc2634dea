"""Training rounds in the store: their write path, the round lock, and their read model.

A round's `state` only moves forward through `advance`, a compare-and-set: it locks the row,
checks that the state is still the one the caller read, merges the stage's outputs into
`metrics`, and moves the state, all in the caller's one transaction. Two processes resuming the
same round cannot both advance it: the second gets `StaleState` and nothing it computed is
written. Like store/repo.py, every function takes the session and never commits.

    with db.write() as session:
        rnd = create_round(session, algo="dpo", config={...}, trigger="manual")
    with db.write() as session:
        advance(session, round_id=rnd.id, expected="collect", to="generate",
                outputs={"collect": {"prompt_ids": [...]}})

The round lock (`round_lock` table) is a lease: `acquire_lock` takes it when free or expired,
`renew_lock` extends it while the round runs, `release_lock` frees it. A holder that died stops
renewing, so another process can take over after the lease runs out.

The read model (`RoundSummary`, `summaries`, `round_task_counts`) and the queries the round's
stages read with live here too, so the loop (loop/) and the admin view (app/admin.py) share them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    Label,
    LabelStatus,
    PolicyVersion,
    Prompt,
    Round,
    RoundLock,
    RoundSchedule,
    Task,
    TaskItem,
    utcnow,
)

# Stages in order; `state` is the next one to run, then one of the outcomes.
STAGES: tuple[str, ...] = ("collect", "generate", "label", "build_dataset", "train",
                           "evaluate", "decide")
OUTCOMES: tuple[str, ...] = ("promoted", "rejected", "cancelled")
STATES: tuple[str, ...] = STAGES + OUTCOMES
ALGOS: tuple[str, ...] = ("dpo", "kto", "ppo", "grpo", "rs")
TRIGGERS: tuple[str, ...] = ("manual", "interval", "cron", "labels", "demo", "test")
ROUNDS_LOCK = "rounds"


class StaleState(Conflict):
    """The round is no longer in the state the caller expected (another process moved it)."""


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive (they were stored as UTC).
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def next_state(state: str) -> str:
    """The stage after `state` (decide has two outcomes and is not advanced through this)."""
    if state not in STAGES or state == "decide":
        raise InvalidInput(f"{state!r} has no single next stage")
    return STAGES[STAGES.index(state) + 1]


def is_finished(state: str) -> bool:
    return state in OUTCOMES


def _lock_round(session: Session, round_id: int) -> Round:
    query = select(Round).where(Round.id == round_id)
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()  # SQLite: BEGIN IMMEDIATE already serialises writers
    found = session.exec(query.execution_options(populate_existing=True)).first()
    if found is None:
        raise NotFound(f"round {round_id} does not exist")
    return found


def unfinished_round(session: Session) -> Round | None:
    """The oldest round not yet promoted, rejected or cancelled (normally at most one)."""
    return session.exec(
        select(Round).where(col(Round.state).not_in(OUTCOMES)).order_by(col(Round.id))
    ).first()


def create_round(session: Session, *, algo: str, config: dict[str, Any], trigger: str = "manual",
                 run_dir: str | None = None) -> Round:
    """A new round in state `collect`. Refused (Conflict) while another round is unfinished:
    resume or cancel it first, so two rounds never train from the same deployed policy."""
    if algo not in ALGOS:
        raise InvalidInput(f"algo must be one of {', '.join(ALGOS)}, not {algo!r}")
    if trigger not in TRIGGERS:
        raise InvalidInput(f"trigger must be one of {', '.join(TRIGGERS)}")
    # Serialise round creation on the lock row (PostgreSQL: FOR UPDATE), so two processes
    # cannot both see "no unfinished round" and both create one.
    _lock_row(session, ROUNDS_LOCK)
    pending = unfinished_round(session)
    if pending is not None:
        raise Conflict(f"round {pending.id} is unfinished (state {pending.state}): "
                       f"`prefloop round resume` or `prefloop round cancel {pending.id}` first")
    rnd = Round(algo=algo, state="collect", config=config, metrics={}, trigger=trigger,
                run_dir=run_dir)
    session.add(rnd)
    session.flush()
    return rnd


def set_run_dir(session: Session, *, round_id: int, run_dir: str) -> Round:
    """Record where the round writes its artefacts (named after its id, so set after insert)."""
    rnd = _lock_round(session, round_id)
    rnd.run_dir = run_dir
    session.add(rnd)
    session.flush()
    return rnd


def get_round(session: Session, round_id: int) -> Round | None:
    return session.get(Round, round_id)


def advance(session: Session, *, round_id: int, expected: str, to: str,
            outputs: dict[str, Any] | None = None, run_dir: str | None = None) -> Round:
    """Move the round from `expected` to `to` and merge `outputs` into its metrics (by key:
    a stage writes its own key, e.g. {"generate": {...}}). StaleState if the round moved."""
    if to not in STATES:
        raise InvalidInput(f"unknown round state {to!r}")
    if expected in OUTCOMES:
        raise InvalidInput(f"round state {expected!r} is final")
    allowed = ({"promoted", "rejected"} if expected == "decide" else {next_state(expected)})
    if to not in allowed | {"cancelled"}:
        raise InvalidInput(f"a round cannot go from {expected} to {to}")
    rnd = _lock_round(session, round_id)
    if rnd.state != expected:
        raise StaleState(f"round {round_id} is in state {rnd.state}, not {expected}")
    rnd.metrics = {**(rnd.metrics or {}), **(outputs or {})}
    rnd.state = to
    rnd.error = None
    if run_dir is not None:
        rnd.run_dir = run_dir
    now = utcnow()
    rnd.updated_at = now
    if to in OUTCOMES:
        rnd.finished_at = now
    session.add(rnd)
    session.flush()
    return rnd


def record_progress(session: Session, *, round_id: int, expected: str,
                    outputs: dict[str, Any]) -> Round:
    """Merge outputs into the metrics without moving the state (e.g. a stage's partial work,
    timings of an attempt); StaleState if the round moved meanwhile."""
    rnd = _lock_round(session, round_id)
    if rnd.state != expected:
        raise StaleState(f"round {round_id} is in state {rnd.state}, not {expected}")
    rnd.metrics = {**(rnd.metrics or {}), **outputs}
    rnd.updated_at = utcnow()
    session.add(rnd)
    session.flush()
    return rnd


def record_error(session: Session, *, round_id: int, error: str) -> Round:
    """Note why the last attempt of the current stage failed (the state does not move)."""
    rnd = _lock_round(session, round_id)
    rnd.error = error[:10_000]
    rnd.updated_at = utcnow()
    session.add(rnd)
    session.flush()
    return rnd


def cancel_round(session: Session, *, round_id: int, reason: str) -> Round:
    """Abandon an unfinished round (its rows stay, for the record)."""
    rnd = _lock_round(session, round_id)
    if rnd.state in OUTCOMES:
        raise Conflict(f"round {round_id} is already {rnd.state}")
    return advance(session, round_id=round_id, expected=rnd.state, to="cancelled",
                   outputs={"cancelled": {"reason": reason, "at_state": rnd.state}})


def list_rounds(session: Session, *, limit: int = 100) -> list[Round]:
    """Rounds, oldest first (the last `limit`)."""
    rows = session.exec(select(Round).order_by(col(Round.id).desc()).limit(limit)).all()
    return list(reversed(rows))


def max_label_id(session: Session) -> int:
    return int(session.exec(select(func.coalesce(func.max(col(Label.id)), 0))).one() or 0)


def labels_since(session: Session, watermark: int) -> int:
    """Labels written after the one with id `watermark` (any source, any status)."""
    return int(session.exec(select(func.count()).select_from(Label)
                            .where(col(Label.id) > watermark)).one())


# ---------------------------------------------------------------------------------------------
# The round lock


def make_holder() -> str:
    """A holder name unique to this process and call: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_dead_here(holder: str | None) -> bool:
    """True when `holder` names a process on this host that no longer runs (it was killed):
    its lease can be taken at once instead of waiting for it to expire."""
    if not holder:
        return False
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _lock_row(session: Session, name: str) -> RoundLock:
    """The lock's row (created on first use), locked for this transaction on PostgreSQL."""
    query = select(RoundLock).where(RoundLock.name == name)
    if session.get_bind().dialect.name != "sqlite":
        query = query.with_for_update()
    row = session.exec(query.execution_options(populate_existing=True)).first()
    if row is not None:
        return row
    from store.repo import _insert_or_get

    _insert_or_get(session, RoundLock(name=name),
                   lambda: session.exec(select(RoundLock).where(RoundLock.name == name)).first())
    row = session.exec(query.execution_options(populate_existing=True)).first()
    assert row is not None
    return row


@dataclass(frozen=True)
class LockState:
    holder: str | None
    round_id: int | None
    expires_at: datetime | None

    def held(self, now: datetime | None = None) -> bool:
        now = now or utcnow()
        return self.holder is not None and self.expires_at is not None and \
            self.expires_at > now


def acquire_lock(session: Session, *, holder: str, ttl_s: float, round_id: int | None = None,
                 name: str = ROUNDS_LOCK, now: datetime | None = None,
                 steal_from: str | None = None) -> bool:
    """Take the lock for `ttl_s` seconds if it is free, expired or already ours, or held by
    `steal_from` (a holder the caller knows is dead, e.g. a killed process on this host)."""
    if ttl_s <= 0:
        raise InvalidInput("ttl_s must be positive")
    now = now or utcnow()
    row = _lock_row(session, name)
    expires = _aware(row.expires_at)
    if row.holder not in (None, holder, steal_from) and expires is not None and expires > now:
        return False
    if row.holder != holder:
        row.acquired_at = now
    row.holder, row.round_id = holder, round_id
    row.expires_at = now + timedelta(seconds=ttl_s)
    session.add(row)
    session.flush()
    return True


def renew_lock(session: Session, *, holder: str, ttl_s: float, round_id: int | None = None,
               name: str = ROUNDS_LOCK, now: datetime | None = None) -> bool:
    """Extend our lease; False if we lost it (it expired and someone else took it)."""
    now = now or utcnow()
    row = _lock_row(session, name)
    if row.holder != holder:
        return False
    row.expires_at = now + timedelta(seconds=ttl_s)
    if round_id is not None:
        row.round_id = round_id
    session.add(row)
    session.flush()
    return True


def release_lock(session: Session, *, holder: str, name: str = ROUNDS_LOCK) -> bool:
    row = _lock_row(session, name)
    if row.holder != holder:
        return False
    row.holder, row.expires_at = None, None
    session.add(row)
    session.flush()
    return True


def lock_state(session: Session, name: str = ROUNDS_LOCK) -> LockState:
    row = session.get(RoundLock, name)
    if row is None:
        return LockState(None, None, None)
    return LockState(row.holder, row.round_id, _aware(row.expires_at))


# ---------------------------------------------------------------------------------------------
# The schedule (what `prefloop up` runs rounds on)


def save_schedule(session: Session, *, name: str, config: dict[str, Any],
                  next_run_at: datetime | None, owner: str | None,
                  last_run_at: datetime | None = None, last_round_id: int | None = None,
                  label_watermark: int | None = None) -> RoundSchedule:
    row = session.get(RoundSchedule, name)
    if row is None:
        row = RoundSchedule(name=name, config=config)
    row.config, row.next_run_at, row.owner = config, next_run_at, owner
    if last_run_at is not None:
        row.last_run_at = last_run_at
    if last_round_id is not None:
        row.last_round_id = last_round_id
    if label_watermark is not None:
        row.label_watermark = label_watermark
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return row


def get_schedule(session: Session, name: str) -> RoundSchedule | None:
    return session.get(RoundSchedule, name)


def list_schedules(session: Session) -> list[RoundSchedule]:
    return list(session.exec(select(RoundSchedule).order_by(col(RoundSchedule.name))).all())


# ---------------------------------------------------------------------------------------------
# What the round's stages read, and the deployed policy a round starts from


def round_task_ids(session: Session, round_id: int, source: str) -> list[int]:
    """The ids of the round's tasks of `source` ("round:<id>" train, "round:<id>:eval")."""
    return list(session.exec(select(Task.id).where(Task.round_id == round_id,
                                                   Task.source == source)
                             .order_by(col(Task.id))).all())  # type: ignore[arg-type]


def labels_by_source(session: Session, task_ids: Sequence[int]) -> dict[str, int]:
    """Label counts on these tasks by annotator kind; invalid judge outputs counted apart."""
    counts: Counter[str] = Counter()
    for start in range(0, len(task_ids), 500):
        rows = session.exec(
            select(Annotator.kind, Label.status)
            .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(col(Label.task_id).in_(list(task_ids[start:start + 500])))
        ).all()
        for kind, status in rows:
            key = AnnotatorKind(kind).value
            counts[key if status == LabelStatus.submitted else f"{key}_invalid"] += 1
    return {k: counts.get(k, 0) for k in ("rule", "ai", "human", "ai_invalid")} | {
        k: v for k, v in counts.items() if k not in ("rule", "ai", "human", "ai_invalid")}


def labels_with_judges(session: Session, task_ids: Sequence[int]
                       ) -> list[tuple[Label, str]]:
    """Every label on these tasks with its annotator's name (the eval verdicts)."""
    out: list[tuple[Label, str]] = []
    for start in range(0, len(task_ids), 500):
        out.extend(session.exec(
            select(Label, Annotator.name)
            .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(col(Label.task_id).in_(list(task_ids[start:start + 500])))
        ).all())
    return out


def annotator_label_count(session: Session, annotator_id: int, task_ids: Sequence[int]) -> int:
    """Labels (any status) this annotator wrote on these tasks."""
    if not task_ids:
        return 0
    return len(session.exec(select(Label.id).where(
        Label.annotator_id == annotator_id, col(Label.task_id).in_(list(task_ids)))).all())


def prompts_by_ids(session: Session, ids: Sequence[int]) -> list[Prompt]:
    """The prompts with these ids, in the order of `ids`."""
    rows = {p.id: p for p in session.exec(select(Prompt).where(col(Prompt.id).in_(list(ids))))}
    return [rows[i] for i in ids]


def split_prompts(session: Session, dataset: str, split: str) -> list[Prompt]:
    """The stored prompts of one dataset split, oldest first."""
    return list(session.exec(select(Prompt).where(
        Prompt.dataset == dataset, Prompt.split == split).order_by(col(Prompt.id))).all())


def ensure_deployed(session: Session, *, base_model: str, weights_uri: str, actor: str
                    ) -> PolicyVersion:
    """The deployed policy; on a store with none, `base_model` (its weights at `weights_uri`)
    registered under its own name and deployed."""
    from store import deployments

    policy = deployments.deployed(session)
    if policy is not None:
        return policy
    policy = session.exec(select(PolicyVersion).where(
        PolicyVersion.name == base_model)).first()
    if policy is None:
        policy = deployments.register_policy(session, name=base_model, base_model=base_model,
                                             weights_uri=weights_uri)
    return deployments.promote(session, policy_id=policy.id or 0, actor=actor)


# ---------------------------------------------------------------------------------------------
# Summaries (the CLI table, the demo, the admin view)


@dataclass(frozen=True)
class RoundSummary:
    """One round as the tables and plots show it (read from its stored metrics)."""

    id: int
    algo: str
    state: str
    trigger: str | None
    labels: dict[str, int]
    win_rate: float | None
    reward_candidate: float | None
    reward_deployed: float | None
    kl: float | None
    train_rows: int | None
    wall_s: float
    timings: dict[str, float]
    error: str | None
    created_at: Any
    # The label stage's live calibration of the LLM judges against the reference judge.
    ai_calibration: dict[str, Any] = field(default_factory=dict)
    routed: int | None = None

    @classmethod
    def of(cls, rnd: Round) -> RoundSummary:
        m = rnd.metrics or {}
        ev = m.get("evaluate", {})
        reward = ev.get("reward", {})
        timings = {k: float(v) for k, v in m.get("timings", {}).items()}
        return cls(id=rnd.id or 0, algo=rnd.algo, state=rnd.state, trigger=rnd.trigger,
                   labels=m.get("label", {}).get("labels", {}), win_rate=ev.get("win_rate"),
                   reward_candidate=reward.get("candidate"),
                   reward_deployed=reward.get("deployed"), kl=ev.get("kl"),
                   train_rows=m.get("build_dataset", {}).get("rows"),
                   wall_s=sum(timings.values()), timings=timings, error=rnd.error,
                   created_at=rnd.created_at,
                   ai_calibration=dict(m.get("label", {}).get("calibration") or {}),
                   routed=(m.get("label", {}).get("routing") or {}).get("routed"))


def summaries(db: Database, limit: int = 100) -> list[RoundSummary]:
    """The last `limit` rounds, oldest first."""
    with db.read() as session:
        return [RoundSummary.of(r) for r in list_rounds(session, limit=limit)]


def round_task_counts(db: Database, round_id: int) -> dict[str, int]:
    """Rows a round owns (tests and `round status`): tasks, items, labels of train and eval."""
    with db.read() as session:
        out = {}
        for name, source in (("train", f"round:{round_id}"), ("eval", f"round:{round_id}:eval")):
            ids = round_task_ids(session, round_id, source)
            out[f"{name}_tasks"] = len(ids)
            out[f"{name}_labels"] = session.exec(select(Label.id).where(
                col(Label.task_id).in_(ids))).all().__len__() if ids else 0
            out[f"{name}_items"] = len(session.exec(select(TaskItem.id).where(
                col(TaskItem.task_id).in_(ids))).all()) if ids else 0
        return out
