"""What every stage of a round shares: its context, its result, and where its compute runs.

`StageContext` carries the store, the runs folder and the judge endpoint of one runner;
`StageResult` is a stage's outputs plus its one write (run in the transaction that advances the
round); `run_compute` runs a stage's heavy function here or as one Ray task.

    python -c "from loop.stages.common import run_compute; print(run_compute(len, 'abc',
        use_ray=False))"
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlmodel import Session

from store import rounds as store_rounds
from store.db import Database
from store.errors import NotFound
from store.models import Prompt, Round

if TYPE_CHECKING:
    from loop.config import RoundConfig
    from loop.stages.judging import JudgeEndpoint

T = TypeVar("T")


@dataclass
class StageResult:
    outputs: dict[str, Any]
    write: Callable[[Session], dict[str, Any]] | None = None
    """Rows to write in the advancing transaction; returns more outputs."""
    to: str | None = None
    """The next state when it is not simply the next stage (decide)."""


@dataclass
class StageContext:
    """One runner's store, runs folder and judge endpoint, as the stages see them."""

    db: Database
    runs_dir: Path
    judge_endpoint: JudgeEndpoint | None = None
    progress: bool = True
    """Show the judges' progress bars."""
    trainer_calls: int = field(default=0)
    """How many times the train stage trained in this runner (tests assert on it)."""

    def run_dir(self, rnd: Round) -> Path:
        """The round's artefact folder (created on first use)."""
        path = Path(rnd.run_dir or self.runs_dir / f"round-{rnd.id:04d}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load(self, round_id: int) -> Round:
        with self.db.read() as session:
            rnd = store_rounds.get_round(session, round_id)
        if rnd is None:
            raise NotFound(f"round {round_id} does not exist")
        return rnd

    def prompts(self, ids: list[int]) -> list[Prompt]:
        with self.db.read() as session:
            return store_rounds.prompts_by_ids(session, ids)

    def compute(self, config: RoundConfig, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` where the round config says (Ray or this process)."""
        return run_compute(fn, *args, use_ray=config.use_ray, ray_address=config.ray_address,
                           num_cpus=config.ray_num_cpus, **kwargs)


def run_compute(fn: Callable[..., T], *args: Any, use_ray: bool, ray_address: str | None = None,
                num_cpus: int = 2, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` here, or as one Ray task (local Ray unless `ray_address`).

    Ray's default is at-most-once (`max_retries=0` here too): every function run this way is
    idempotent on its outputs (fixed seeds, run folders that resume), so the driver may simply
    call it again after a failure.
    """
    if not use_ray:
        return fn(*args, **kwargs)
    import ray

    from training.raycluster import ensure_ray

    if not ray_address:
        # Ray starts local workers at niceness 15: on a busy machine a stage's task then gets a
        # fraction of a core behind everything else. The local raylet reads this at start.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ensure_ray(ray_address, num_cpus=None if ray_address else max(num_cpus, os.cpu_count() or 1))
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(fn)
    result: T = ray.get(remote.remote(*args, **kwargs))
    return result


def set_threads() -> None:
    """Follow the Ray task's CPU share in torch (called first by every compute function)."""
    # Ray sets OMP_NUM_THREADS to the task's num_cpus; torch must follow it explicitly.
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
