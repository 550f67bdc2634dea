"""The round scheduler: interval, cron and label-count triggers; one round at a time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from loop.schedule import RoundScheduler, ScheduleConfig, ScheduleError, due, next_time
from store import repo
from store import rounds as store_rounds
from store.models import AnnotatorKind

T0 = datetime(2026, 1, 1, 0, 3, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_cron_and_interval_next_times_are_computed_from_the_last_run():
    cron = ScheduleConfig(cron="*/5 * * * *")
    assert next_time(cron, None, T0) == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert next_time(cron, datetime(2026, 1, 1, 0, 5, tzinfo=UTC), T0) == \
        datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    every = ScheduleConfig(interval_s=3600)
    assert next_time(every, None, T0) == T0
    assert next_time(every, T0, T0) == T0 + timedelta(hours=1)
    both = ScheduleConfig(interval_s=60, cron="0 * * * *")
    assert next_time(both, T0, T0) == T0 + timedelta(seconds=60)
    assert next_time(ScheduleConfig(min_new_labels=5), T0, T0) is None


def test_due_fires_on_time_or_on_enough_labels():
    config = ScheduleConfig(interval_s=60, min_new_labels=10)
    later = T0 + timedelta(seconds=59)
    assert due(config, now=later, next_run_at=T0 + timedelta(seconds=60), new_labels=9) is None
    assert due(config, now=later, next_run_at=T0 + timedelta(seconds=60),
               new_labels=10) == "labels"
    assert due(config, now=T0 + timedelta(seconds=60), next_run_at=T0 + timedelta(seconds=60),
               new_labels=0) == "interval"


@pytest.mark.parametrize("bad", [{}, {"cron": "every day"}, {"interval_s": 0},
                                 {"min_new_labels": 0}])
def test_a_schedule_that_cannot_work_is_refused(bad):
    with pytest.raises(ScheduleError):
        ScheduleConfig(**bad)


def _fake_runs(db):
    """A run_round that creates and finishes a round, and counts its calls."""
    calls: list[str] = []

    def run_round(trigger: str):
        calls.append(trigger)
        with db.write() as session:
            rnd = store_rounds.create_round(session, algo="dpo", config={}, trigger=trigger)
            store_rounds.cancel_round(session, round_id=rnd.id, reason="fake")
            return SimpleNamespace(id=rnd.id)

    return calls, run_round


def test_interval_schedule_runs_once_per_interval(db):
    calls, run_round = _fake_runs(db)
    clock = Clock(T0)
    scheduler = RoundScheduler(db, ScheduleConfig(interval_s=600), run_round=run_round,
                               clock=clock)
    assert scheduler.tick() == "interval"  # never ran: due at once
    assert scheduler.tick() is None
    clock.now = T0 + timedelta(seconds=599)
    assert scheduler.tick() is None
    clock.now = T0 + timedelta(seconds=600)
    assert scheduler.tick() == "interval"
    assert calls == ["interval", "interval"]
    assert scheduler.status()["last_round_id"] == 2


def test_label_trigger_counts_labels_since_the_last_round(db):
    calls, run_round = _fake_runs(db)
    assert calls == []
    scheduler = RoundScheduler(db, ScheduleConfig(min_new_labels=2), run_round=run_round,
                               clock=Clock(T0))
    from tests.store.factories import task

    def label(prompt: str) -> None:
        with db.write() as session:
            judge = repo.get_or_create_annotator(session=session, name="rule:x@1",
                                                 kind=AnnotatorKind.rule)
            t = task(session, prompt=prompt)
            repo.submit_label(session=session, task_id=t.id, annotator_id=judge.id,
                              value={"choice": "a"})

    label("one")
    assert scheduler.tick() is None
    label("two")
    assert scheduler.tick() == "labels"
    assert scheduler.tick() is None  # the watermark moved: the same labels count once
    assert scheduler.status()["new_labels"] == 0


def test_an_unfinished_round_is_resumed_before_a_new_one_starts(db):
    calls, run_round = _fake_runs(db)
    resumed: list[int] = []
    with db.write() as session:
        pending = store_rounds.create_round(session, algo="dpo", config={})

    def resume():
        with db.write() as session:
            store_rounds.cancel_round(session, round_id=pending.id, reason="resumed")
        resumed.append(pending.id)

    scheduler = RoundScheduler(db, ScheduleConfig(interval_s=60), run_round=run_round,
                               resume_round=resume, clock=Clock(T0))
    assert scheduler.tick() == "resumed"
    assert scheduler.tick() == "interval"
    assert resumed == [pending.id] and calls == ["interval"]


def test_no_round_starts_while_another_process_holds_the_round_lock(db):
    calls, run_round = _fake_runs(db)
    with db.write() as session:
        store_rounds.acquire_lock(session, holder=store_rounds.make_holder(), ttl_s=600,
                                  now=T0)
    scheduler = RoundScheduler(db, ScheduleConfig(interval_s=60), run_round=run_round,
                               clock=Clock(T0))
    assert scheduler.tick() is None
    assert calls == []


def test_two_schedulers_ticking_together_run_one_round(sqlite_db):
    db = sqlite_db
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def run_round(trigger: str):
        # Holds the lock like RoundRunner.run, for as long as the other scheduler ticks.
        holder = store_rounds.make_holder()
        with db.write() as session:
            if not store_rounds.acquire_lock(session, holder=holder, ttl_s=600):
                return None
        calls.append(trigger)
        started.set()
        release.wait(10)
        with db.write() as session:
            store_rounds.release_lock(session, holder=holder)
        return None

    first = RoundScheduler(db, ScheduleConfig(interval_s=60, name="a"), run_round=run_round)
    second = RoundScheduler(db, ScheduleConfig(interval_s=60, name="b"), run_round=run_round)
    thread = threading.Thread(target=first.tick)
    thread.start()
    assert started.wait(10)
    assert second.tick() is None  # the lock is held: it waits for its next tick
    release.set()
    thread.join(10)
    assert calls == ["interval"]


def test_start_and_stop_run_ticks_in_a_thread(db):
    calls, run_round = _fake_runs(db)
    scheduler = RoundScheduler(db, ScheduleConfig(interval_s=3600, tick_s=0.05),
                               run_round=run_round)
    scheduler.start()
    deadline = threading.Event()
    for _ in range(100):
        if calls:
            break
        deadline.wait(0.05)
    scheduler.stop()
    assert calls == ["interval"]
