"""The round scheduler of `prefloop up`: rounds on an interval, a cron expression, or once enough
new labels arrived; at most one round at a time, across processes too.

    scheduler = RoundScheduler(db, ScheduleConfig(cron="0 */6 * * *", min_new_labels=200),
                               run_round=lambda trigger: runner_round(trigger))
    scheduler.start()     # a daemon thread; ticks every `tick_s`
    ...
    scheduler.stop()

A tick is a pure decision (`due`) on the stored schedule row plus one action: resume the
unfinished round if there is one, else start a round if the interval/cron time came or the label
count passed the threshold. The round lock (store/rounds.py) is what keeps it to one round: a
tick that cannot take it (another process's round runs) just waits for the next tick. Cron
expressions are read with croniter (pallets-eco/croniter).

    prefloop up --rounds-cron "0 */6 * * *" --rounds-after-labels 200
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from store import rounds as store_rounds
from store.db import Database
from store.models import utcnow
from training.config_reader import ConfigError, build

log = logging.getLogger("prefloop.schedule")


class ScheduleError(ConfigError):
    """A schedule that cannot work (bad cron expression, nothing to trigger on)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """When rounds run. Any combination; a round starts when the first condition holds."""

    name: str = "default"
    interval_s: float | None = None
    """Start a round this long after the last one started."""
    cron: str | None = None
    """A 5-field cron expression (UTC), e.g. "0 */6 * * *"."""
    min_new_labels: int | None = None
    """Start a round once this many labels arrived since the last round started."""
    tick_s: float = 30.0
    """How often the scheduler looks."""
    resume_unfinished: bool = True
    """Resume an unfinished round (a crashed process's) before starting a new one."""

    def __post_init__(self) -> None:
        if self.interval_s is None and self.cron is None and self.min_new_labels is None:
            raise ScheduleError("a schedule needs interval_s, cron or min_new_labels")
        if self.interval_s is not None and self.interval_s <= 0:
            raise ScheduleError("interval_s must be positive")
        if self.min_new_labels is not None and self.min_new_labels < 1:
            raise ScheduleError("min_new_labels must be >= 1")
        if self.tick_s <= 0:
            raise ScheduleError("tick_s must be positive")
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ScheduleError(f"not a valid cron expression: {self.cron!r}")

    def describe(self) -> str:
        parts = []
        if self.interval_s is not None:
            parts.append(f"every {self.interval_s:g} s")
        if self.cron is not None:
            parts.append(f"cron {self.cron!r} (UTC)")
        if self.min_new_labels is not None:
            parts.append(f"after {self.min_new_labels} new labels")
        return " or ".join(parts)


def schedule_from_dict(data: dict[str, Any]) -> ScheduleConfig:
    """A type-checked ScheduleConfig from plain values (the `prefloop up` flags)."""
    config: ScheduleConfig = build(ScheduleConfig, data, ScheduleError, what="schedule")
    return config


def next_time(config: ScheduleConfig, last_run_at: datetime | None, now: datetime
              ) -> datetime | None:
    """When the next time-based round is due (None when only the label trigger is set)."""
    due: list[datetime] = []
    if config.interval_s is not None:
        due.append(now if last_run_at is None else
                   last_run_at + timedelta(seconds=config.interval_s))
    if config.cron is not None:
        from croniter import croniter

        start = last_run_at or now
        due.append(croniter(config.cron, start).get_next(datetime))
    return min(due) if due else None


def due(config: ScheduleConfig, *, now: datetime, next_run_at: datetime | None,
        new_labels: int) -> str | None:
    """Which trigger fires now ("interval", "cron", "labels"), or None. Pure."""
    if next_run_at is not None and now >= next_run_at:
        return "interval" if config.interval_s is not None else "cron"
    if config.min_new_labels is not None and new_labels >= config.min_new_labels:
        return "labels"
    return None


def _aware(moment: datetime | None) -> datetime | None:
    from datetime import UTC

    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


RunRound = Callable[[str], Any]
"""run_round(trigger): start and run one round to its end (RoundRunner.start + run)."""
ResumeRound = Callable[[], Any]
"""resume_round(): finish the unfinished round (RoundRunner.resume); returns None if none."""


class RoundScheduler:
    """Ticks in a daemon thread; `tick()` is also callable directly (tests, one-shot)."""

    def __init__(self, db: Database, config: ScheduleConfig, *, run_round: RunRound,
                 resume_round: ResumeRound | None = None,
                 clock: Callable[[], datetime] = utcnow):
        self.db = db
        self.config = config
        self.run_round = run_round
        self.resume_round = resume_round
        self.clock = clock
        self.owner = store_rounds.make_holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()  # one tick at a time in this process
        self.last_error: str | None = None
        self._save(initial=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="round-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop ticking. A round in progress finishes in its thread (it is resumable anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("scheduled round failed")
            self._stop.wait(self.config.tick_s)

    # -- one tick ---------------------------------------------------------------------------

    def _save(self, *, initial: bool = False, ran_at: datetime | None = None,
              round_id: int | None = None, watermark: int | None = None) -> None:
        now = self.clock()
        with self.db.write() as session:
            row = store_rounds.get_schedule(session, self.config.name)
            last = ran_at or (_aware(row.last_run_at) if row else None)
            if initial and row is None:
                watermark = store_rounds.max_label_id(session)
            store_rounds.save_schedule(
                session, name=self.config.name, config=asdict(self.config),
                next_run_at=next_time(self.config, last, now), owner=self.owner,
                last_run_at=ran_at, last_round_id=round_id, label_watermark=watermark)

    def tick(self) -> str | None:
        """Resume or start a round if one is due; returns what it did (None: nothing)."""
        if not self._busy.acquire(blocking=False):
            return None
        try:
            now = self.clock()
            with self.db.read() as session:
                lock = store_rounds.lock_state(session)
                pending = store_rounds.unfinished_round(session)
                row = store_rounds.get_schedule(session, self.config.name)
                watermark = row.label_watermark if row else 0
                new_labels = store_rounds.labels_since(session, watermark)
            if lock.held(now) and not store_rounds.holder_is_dead_here(lock.holder):
                return None  # a round runs elsewhere; at most one at a time
            if pending is not None:
                if not self.config.resume_unfinished or self.resume_round is None:
                    return None
                self.resume_round()
                return "resumed"
            trigger = due(self.config, now=now,
                          next_run_at=_aware(row.next_run_at) if row else None,
                          new_labels=new_labels)
            if trigger is None:
                return None
            with self.db.read() as session:
                watermark_now = store_rounds.max_label_id(session)
            # Recorded before the round runs: a crash mid-round does not re-trigger it (the
            # resume path finishes it instead).
            self._save(ran_at=now, watermark=watermark_now)
            result = self.run_round(trigger)
            round_id = getattr(result, "id", None)
            if round_id is not None:
                with self.db.write() as session:
                    store_rounds.save_schedule(
                        session, name=self.config.name, config=asdict(self.config),
                        next_run_at=next_time(self.config, now, self.clock()),
                        owner=self.owner, last_round_id=round_id)
            return trigger
        finally:
            self._busy.release()

    def status(self) -> dict[str, Any]:
        """What the admin view shows: the schedule, the next run, labels since the last."""
        with self.db.read() as session:
            row = store_rounds.get_schedule(session, self.config.name)
            new_labels = store_rounds.labels_since(session, row.label_watermark if row else 0)
            lock = store_rounds.lock_state(session)
        return {"schedule": self.config.describe(),
                "next_run_at": row.next_run_at if row else None,
                "last_run_at": row.last_run_at if row else None,
                "last_round_id": row.last_round_id if row else None,
                "new_labels": new_labels, "round_running": lock.held(),
                "last_error": self.last_error}


def make_round_scheduler(db: Database, config: ScheduleConfig, *, round_config: Any,
                         runs_dir: str, judge_endpoint: Any = None) -> RoundScheduler:
    """The scheduler `prefloop up` starts: each due tick runs one round of `round_config`
    (a loop.config.RoundConfig) with a fresh RoundRunner; unfinished rounds are resumed."""
    from loop.runner import RoundRunner

    def runner() -> RoundRunner:
        return RoundRunner(db, runs_dir=runs_dir, judge_endpoint=judge_endpoint,
                           progress=False, log=log.info)

    def run_round(trigger: str) -> Any:
        r = runner()
        return r.run(r.start(round_config, trigger=trigger))

    return RoundScheduler(db, config, run_round=run_round,
                          resume_round=lambda: runner().resume())
