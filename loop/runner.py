"""Training rounds: collect -> generate -> label -> build dataset -> train -> evaluate -> decide.

A round is a state machine stored in the `round` table (store/rounds.py is its write path). Each
stage (loop/stages/, one module each) reads what earlier stages recorded, computes (the heavy
parts as Ray tasks), and returns its rows as ONE write, which this runner commits together with
the state's compare-and-set advance. So a process killed anywhere either committed the stage or
left no trace of it, and `prefloop round resume` redoes at most the stage in flight:

- generate: completions and tasks are get-or-create keyed (same seed -> same samples), written
  with the advance; a rerun adds nothing twice;
- label: one label per (task, judge) is a database constraint; a rerun fills only what is missing;
- build dataset: the export file is written (by rename) before its snapshot row and the advance;
- train: the run folder resumes from its last complete checkpoint, and a finished run (marker
  file) is never trained again; the candidate is registered with the advance;
- evaluate: held-out completions and eval tasks are get-or-create keyed, judges idempotent;
- decide: promote / reject (store/deployments.py) with the final advance.

This module only drives: it takes the round lock (a lease in `round_lock`, so at most one round
runs at a time), renews it from a heartbeat thread, and runs the stages in order.

    prefloop round run --algo dpo --config loop/configs/demo.toml
    prefloop round resume
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session

from loop.config import RoundConfig, round_config_of
from loop.stages import collect, dataset, decide, evaluate, generate, label, train
from loop.stages.common import StageContext, StageResult
from loop.stages.judging import JudgeEndpoint
from store import rounds as store_rounds
from store.db import Database
from store.errors import Conflict
from store.models import Round

Hook = Callable[[str, str], None]  # (event, stage): "computed" before the advance, "advanced"
Stage = Callable[[StageContext, Round, RoundConfig], StageResult]

STAGES: dict[str, Stage] = {
    "collect": collect.run, "generate": generate.run, "label": label.run,
    "build_dataset": dataset.run, "train": train.run, "evaluate": evaluate.run,
    "decide": decide.run,
}


class RoundRunner:
    """Runs rounds against one store; at most one round at a time (the round lock).

    Args:
        db: the store.
        runs_dir: each round's artefacts go to runs_dir/round-<id>.
        hook: called as hook(event, stage) with event "computed" (work done, nothing of the
            stage committed) and "advanced" (committed); tests kill the process there.
        judge_endpoint: base URL (and key, model) for every LLM judge of the round.
        log: where progress lines go.
    """

    def __init__(self, db: Database, *, runs_dir: str | Path, hook: Hook | None = None,
                 judge_endpoint: JudgeEndpoint | None = None, lock_ttl_s: float = 600.0,
                 log: Callable[[str], None] | None = None, progress: bool = True):
        self.db = db
        self.runs_dir = Path(runs_dir)
        self.hook = hook
        self.lock_ttl_s = lock_ttl_s
        self.log = log or (lambda _message: None)
        self.holder = store_rounds.make_holder()
        self.context = StageContext(db, self.runs_dir, judge_endpoint=judge_endpoint,
                                    progress=progress)

    @property
    def trainer_calls(self) -> int:
        """How many times this runner trained (tests assert on it)."""
        return self.context.trainer_calls

    # -- public -----------------------------------------------------------------------------

    def start(self, config: RoundConfig, *, trigger: str = "manual") -> int:
        """Create a round (refused while another is unfinished); returns its id."""
        with self.db.write() as session:
            rnd = store_rounds.create_round(session, algo=config.algo, config=config.to_dict(),
                                            trigger=trigger)
            assert rnd.id is not None
            store_rounds.set_run_dir(session, round_id=rnd.id,
                                     run_dir=str((self.runs_dir / f"round-{rnd.id:04d}")
                                                 .resolve()))
            return rnd.id

    def run(self, round_id: int) -> Round:
        """Drive the round to promoted/rejected, resuming from wherever it stands."""
        with self.db.read() as session:
            current = store_rounds.lock_state(session).holder
        dead = current if store_rounds.holder_is_dead_here(current) else None
        with self.db.write() as session:
            if not store_rounds.acquire_lock(session, holder=self.holder, ttl_s=self.lock_ttl_s,
                                             round_id=round_id, steal_from=dead):
                state = store_rounds.lock_state(session)
                raise Conflict(f"another process runs a round ({state.holder}, round "
                               f"{state.round_id}, lease until {state.expires_at})")
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(round_id, stop), daemon=True,
                                     name="round-lock-heartbeat")
        heartbeat.start()
        try:
            return self._drive(round_id)
        finally:
            stop.set()
            heartbeat.join(timeout=5)
            with self.db.write() as session:
                store_rounds.release_lock(session, holder=self.holder)

    def resume(self) -> Round | None:
        """Finish the unfinished round, if there is one."""
        with self.db.read() as session:
            pending = store_rounds.unfinished_round(session)
        return None if pending is None else self.run(pending.id or 0)

    # -- machinery --------------------------------------------------------------------------

    def _heartbeat(self, round_id: int, stop: threading.Event) -> None:
        while not stop.wait(max(1.0, self.lock_ttl_s / 4)):
            try:
                with self.db.write() as session:
                    store_rounds.renew_lock(session, holder=self.holder, ttl_s=self.lock_ttl_s,
                                            round_id=round_id)
            except Exception:
                continue

    def _drive(self, round_id: int) -> Round:
        rnd = self.context.load(round_id)
        config = round_config_of(rnd)
        while not store_rounds.is_finished(rnd.state):
            stage = rnd.state
            self.log(f"round {round_id}: {stage}")
            started = time.perf_counter()
            try:
                result = STAGES[stage](self.context, rnd, config)
                if self.hook is not None:
                    self.hook("computed", stage)
                wall = time.perf_counter() - started
                timings = {**(rnd.metrics or {}).get("timings", {})}
                timings[stage] = round(timings.get(stage, 0.0) + wall, 3)

                def commit(session: Session, stage: str = stage, result: StageResult = result,
                           timings: dict[str, float] = timings) -> Round:
                    extra = result.write(session) if result.write is not None else {}
                    return store_rounds.advance(
                        session, round_id=round_id, expected=stage,
                        to=result.to or store_rounds.next_state(stage),
                        outputs={stage: {**result.outputs, **extra}, "timings": timings})

                rnd = self.db.run_write(commit)
            except BaseException as exc:
                if not isinstance(exc, KeyboardInterrupt | SystemExit):
                    with self.db.write() as session:
                        store_rounds.record_error(session, round_id=round_id,
                                                  error=f"{stage}: {type(exc).__name__}: {exc}")
                raise
            if self.hook is not None:
                self.hook("advanced", stage)
            self.log(f"round {round_id}: {stage} done in {time.perf_counter() - started:.1f} s")
        return rnd
