"""Run `train_from_cli` jobs on N CPU processes (gloo), as the deepspeed launcher would.

Each spawned process gets the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT; PLATFORM.md section 8) and runs the same jobs in order, so a test can train, crash
and resume with one process start-up (importing torch + DeepSpeed costs seconds per process).

    python -c "from tests.training.multirank import run_ranks; help(run_ranks)"
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.toml"


class CrashAfterStep(Exception):
    """Raised by a job's step callback to simulate an interrupted run."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, jobs: list[dict[str, Any]]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    from training.trainer import train_from_cli

    for job in jobs:
        job = dict(job)
        crash_after = job.pop("crash_after", None)

        def crash(step: int, _metrics: dict[str, float], limit: int | None = crash_after) -> None:
            if limit is not None and step == limit:
                raise CrashAfterStep(step)

        try:
            train_from_cli(on_step_end=crash, config_path=TINY, **job)
        except CrashAfterStep:
            continue


def run_ranks(world_size: int, jobs: list[dict[str, Any]]) -> None:
    """Run `jobs` (train_from_cli keyword arguments, plus optional `crash_after`: a step after
    which the job stops as if killed) on `world_size` spawned processes; raise if a rank fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world_size, free_port(), jobs), nprocs=world_size,
                       join=True, start_method="spawn")
