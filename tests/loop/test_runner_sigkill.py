"""A real SIGKILL of the round driver, then `prefloop round resume` in another process.

The child process runs a round on a tiny model and kills itself with SIGKILL at a stage boundary
(no `finally`, no lock release, nothing flushed). The resume must take over the dead process's
lease at once (same host, pid gone), finish the round, and leave the same rows as an
uninterrupted round, with the trainer run exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.loop.test_runner import (  # noqa: F401  (tiny_policy is a fixture)
    make_config,
    row_counts,
    seed_prompts,
    tiny_policy,
    train_steps_logged,
)

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from loop.config import round_config_from_dict
    from loop.runner import RoundRunner
    from store.db import Database

    db = Database.from_url({url!r})
    config = round_config_from_dict(json.loads(Path({config!r}).read_text()))

    def hook(event, stage):
        if (event, stage) == ({event!r}, {stage!r}):
            os.kill(os.getpid(), signal.SIGKILL)

    runner = RoundRunner(db, runs_dir={runs!r}, hook=hook, progress=False)
    runner.run(runner.start(config))
""")


@pytest.mark.parametrize(("stage", "event"), [("train", "computed"), ("label", "advanced")])
def test_sigkill_at_a_boundary_then_resume_from_the_cli(sqlite_db, tmp_path, tiny_policy,  # noqa: F811
                                                        stage, event, monkeypatch):
    seed_prompts(sqlite_db)
    config = make_config(tmp_path, tiny_policy)
    config_path = tmp_path / "round.json"
    config_path.write_text(json.dumps(config.to_dict()))
    url = sqlite_db.url
    runs = str(tmp_path / "runs")
    script = CHILD.format(repo=str(REPO), url=url, config=str(config_path), event=event,
                          stage=stage, runs=runs)
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    from cli import app

    monkeypatch.setenv("PREFLOOP_DB_URL", url)
    result = CliRunner().invoke(app, ["round", "resume", "--runs-dir", runs])
    assert result.exit_code == 0, result.output
    with sqlite_db.read() as session:
        from store.models import Round

        rnd = session.get(Round, 1)
    assert rnd.state == "promoted"
    assert train_steps_logged(rnd) == 2
    run_json = json.loads((Path(rnd.run_dir) / "policy_run" / "train" / "run.json").read_text())
    # Rewritten with resumed_from_step = 2 had the trainer been called again.
    assert run_json["steps_done"] == 2 and run_json["resumed_from_step"] == 0
    counts = row_counts(sqlite_db)
    assert counts["PolicyVersion"] == 2 and counts["ExportSnapshot"] == 1
    assert counts["Round"] == 1
    assert os.path.exists(Path(rnd.run_dir) / "policy_run" / "round_train.json")
