"""kill -9 the labeler mid-batch, several times: nothing lost, nothing written twice, and each
resume redoes at most the work that was in flight (RELIABILITY.md B4 #28)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text
from sqlmodel import select

from store import migrate
from store.db import Database
from store.models import Label
from tests.feedback.conftest import make_tasks
from tests.feedback.fault_server import FaultServer

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY, WRITE_BATCH, N_TASKS, KILLS = 4, 5, 60, 3


def test_sigkill_mid_run_then_resume(tmp_path: Path, fault_server: FaultServer) -> None:
    fault_server.state.latency_s = 0.03
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    db = Database.from_url(url)
    migrate.upgrade(db.engine)
    ids = make_tasks(db, [("ok", "pairwise", [9, 1])] * N_TASKS)
    judge = tmp_path / "judge.toml"
    judge.write_text(f'model = "fault-judge"\nbase_url = "{fault_server.url}"\n[limits]\n'
                     f"concurrency = {CONCURRENCY}\nwrite_batch = {WRITE_BATCH}\n"
                     "rate_limit_rps = 1000\ntimeout_s = 5\n")
    # The store is named by PREFLOOP_DB_URL, as a deployment would (the environment variable
    # is the settings' source for every process the test starts).
    env = {**os.environ, "PREFLOOP_DB_URL": url}
    command = [sys.executable, "cli.py", "judge", "run", "--judge", str(judge), "--json"]
    killed = 0
    for threshold in (20, 50, 80)[:KILLS]:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        while len(fault_server.state.log) < threshold and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, (out + err).decode()[-2000:]
    final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
    stats = json.loads(final.stdout)
    assert killed == KILLS

    with db.read() as session:
        labels = session.exec(select(Label)).all()
        integrity = session.connection().execute(text("PRAGMA integrity_check")).scalar()
    assert integrity == "ok"
    assert sorted(label.task_id for label in labels) == sorted(ids)  # all there, none twice
    assert {label.choice for label in labels} == {"a"}
    assert stats["tasks_pending"] > 0 and stats["failed"] == 0
    # Work lost per kill: the tasks in flight (<= concurrency) plus one unwritten batch.
    requests = len(fault_server.state.log)
    assert requests <= 2 * N_TASKS + KILLS * 2 * (CONCURRENCY + WRITE_BATCH)
