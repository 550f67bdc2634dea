"""Rounds end to end on a tiny model: the state machine, and kill/resume at every stage boundary.

Each round runs collect -> generate -> label (a rule judge) -> build dataset -> train (DPO, 2
steps on a 2-layer model built in-process) -> evaluate -> decide, on a SQLite store. The kill
tests stop the driver at every boundary (after a stage's work but before its commit, and right
after its commit), resume with a fresh runner, and compare every row count with an uninterrupted
round: nothing lost, nothing duplicated, and the trainer ran exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import select

from loop.config import round_config_from_dict
from loop.runner import RoundRunner
from store import repo
from store import rounds as store_rounds
from store.models import (
    Completion,
    ExportSnapshot,
    Label,
    PolicyStatus,
    PolicyVersion,
    Prompt,
    Round,
    Task,
    TaskItem,
)
from store.rounds import round_task_counts

pytest.importorskip("torch")

QUESTIONS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 + 1?", "7"),
             ("What is 9 - 5?", "4"), ("What is 3 + 3?", "6"), ("What is 8 - 1?", "7")]
HELDOUT = [("What is 4 + 4?", "8"), ("What is 5 - 2?", "3"), ("What is 1 + 8?", "9")]

# Random tokens from a tiny model: whether a sample starts with a capital letter is what this
# judge prefers, which splits the samples about evenly and so gives DPO pairs.
RULE_JUDGE = r"""kind = "rule"
name = "capital-start"
version = "1"
[[checks]]
type = "regex"
pattern = '^\s*[A-Z]'
"""


class Killed(Exception):
    """Stands in for a SIGKILL of the driver at a hook point."""


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.models import convert_bundled_tokenizer, load_tokenizer, save_tiny_model

    tokenizer = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
    return save_tiny_model(tmp_path_factory.mktemp("tiny-policy"), tokenizer, seed=0)


def seed_prompts(db: Any) -> None:
    with db.write() as session:
        for split, rows in (("train", QUESTIONS), ("heldout", HELDOUT)):
            for question, answer in rows:
                repo.get_or_create_prompt(session=session, content=[{"role": "user",
                                                                     "content": question}],
                                          dataset="sums", split=split, reference=answer)


def make_config(tmp_path: Path, tiny_policy: Path, **over: Any) -> Any:
    judge = tmp_path / "rule.toml"
    judge.write_text(RULE_JUDGE)
    data: dict[str, Any] = {
        "algo": "dpo", "base_model": str(tiny_policy), "seed": 3, "use_ray": False,
        "task": {"kind": "store", "dataset": "sums", "train_prompts": 6, "heldout_prompts": 3,
                 "heldout_split": "heldout"},
        "generate": {"samples_per_prompt": 3, "max_new_tokens": 6, "max_pairs_per_prompt": 3,
                     "batch_size": 8},
        "label": {"judges": [str(judge)]},
        "dataset": {"sources": ["rule"]},
        "train": {"overrides": ["max_steps=2", "batch_size=2", "save_steps=1", "lora=off",
                                "precision=fp32", "progress=false", "max_length=64"]},
        "evaluate": {"max_new_tokens": 6, "win_rate_threshold": 0.0, "temperature": 1.0},
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return round_config_from_dict(data)


def row_counts(db: Any) -> dict[str, int]:
    with db.read() as session:
        return {model.__name__: session.exec(select(func.count()).select_from(model)).one()
                for model in (Prompt, Completion, Task, TaskItem, Label, ExportSnapshot,
                              PolicyVersion, Round)}


def train_steps_logged(rnd: Round) -> int:
    metrics = Path(rnd.run_dir or "") / "policy_run" / "train" / "metrics.jsonl"
    return sum(1 for line in metrics.read_text().splitlines() if line.strip())


@pytest.fixture
def baseline(sqlite_db, tmp_path, tiny_policy) -> dict[str, Any]:
    """One uninterrupted round: its final state and row counts."""
    seed_prompts(sqlite_db)
    runner = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    round_id = runner.start(make_config(tmp_path, tiny_policy))
    rnd = runner.run(round_id)
    return {"round": rnd, "counts": row_counts(sqlite_db), "trainer_calls": runner.trainer_calls,
            "tasks": round_task_counts(sqlite_db, round_id)}


def test_a_round_runs_every_stage_and_records_its_outputs(baseline, sqlite_db):
    rnd = baseline["round"]
    metrics = rnd.metrics
    assert rnd.state == "promoted"  # threshold 0: any candidate is promoted
    assert set(metrics["timings"]) == set(store_rounds.STAGES)
    assert metrics["generate"]["samples"] == 6 * 3
    assert metrics["generate"]["tasks"] == baseline["tasks"]["train_tasks"] > 0
    assert metrics["label"]["labels"]["rule"] == baseline["tasks"]["train_labels"]
    dataset = metrics["build_dataset"]
    assert dataset["rows"] > 0
    manifest = json.loads(Path(dataset["path"] + ".manifest.json").read_text())
    assert manifest["sha256"] == dataset["sha256"] and manifest["round_id"] == rnd.id
    assert manifest["filters"]["sources"] == ["rule"]
    assert metrics["train"]["steps"] == 2 and baseline["trainer_calls"] == 1
    assert train_steps_logged(rnd) == 2
    evaluation = metrics["evaluate"]
    assert evaluation["n_prompts"] == 3 and evaluation["kl"] >= 0.0
    assert 0.0 <= evaluation["win_rate"] <= 1.0
    assert evaluation["gate_judge"] == "rule:capital-start@1"
    with sqlite_db.read() as session:
        versions = session.exec(select(PolicyVersion).order_by(PolicyVersion.id)).all()
    assert [(v.name, v.status) for v in versions] == [
        (str(Path(versions[0].base_model)), PolicyStatus.retired),
        (f"round-{rnd.id}", PolicyStatus.deployed)]
    assert versions[1].parent_id == versions[0].id and versions[1].round_id == rnd.id
    assert baseline["counts"]["ExportSnapshot"] == 1


def test_a_candidate_without_a_gate_verdict_is_rejected_and_the_old_policy_stays(
        sqlite_db, tmp_path, tiny_policy):
    seed_prompts(sqlite_db)
    runner = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    # The gate judge never labels the eval tasks: no verdict can clear the threshold.
    config = make_config(tmp_path, tiny_policy, evaluate={"gate_judge": "rule:absent@1"})
    rnd = runner.run(runner.start(config))
    assert rnd.state == "rejected"
    assert rnd.metrics["evaluate"]["win_rate"] is None
    assert rnd.metrics["decide"]["reason"] == "no valid eval verdicts"
    with sqlite_db.read() as session:
        statuses = [v.status for v in session.exec(select(PolicyVersion)
                                                   .order_by(PolicyVersion.id))]
    assert statuses == [PolicyStatus.deployed, PolicyStatus.rejected]


# Every boundary: after a stage's work but before its commit ("computed"), and right after its
# commit ("advanced"). Three run in the quick tier, the rest with the slow ones (CI runs both).
QUICK = {("generate", "computed"), ("train", "computed"), ("evaluate", "advanced")}
BOUNDARIES = [pytest.param(stage, event, id=f"{stage}-{event}",
                           marks=() if (stage, event) in QUICK else pytest.mark.slow)
              for stage in store_rounds.STAGES for event in ("computed", "advanced")]


@pytest.mark.parametrize(("stage", "event"), BOUNDARIES)
def test_killed_at_any_stage_boundary_resume_finishes_with_nothing_lost_or_doubled(
        sqlite_db, tmp_path, tiny_policy, baseline_counts, stage, event):
    seed_prompts(sqlite_db)

    def kill(at_event: str, at_stage: str) -> None:
        if (at_event, at_stage) == (event, stage):
            raise Killed(f"{event}:{stage}")

    first = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", hook=kill, progress=False)
    round_id = first.start(make_config(tmp_path, tiny_policy))
    with pytest.raises(Killed):
        first.run(round_id)
    with sqlite_db.read() as session:
        stopped = session.get(Round, round_id)
    expected_state = stage if event == "computed" else (
        store_rounds.next_state(stage) if stage != "decide" else "promoted")
    assert stopped.state == expected_state
    second = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    finished = second.resume() if expected_state != "promoted" else stopped
    assert finished is not None and finished.state == "promoted"
    assert row_counts(sqlite_db) == baseline_counts["counts"]
    assert round_task_counts(sqlite_db, round_id) == baseline_counts["tasks"]
    assert first.trainer_calls + second.trainer_calls == 1
    assert train_steps_logged(finished) == 2
    assert finished.metrics["build_dataset"]["sha256"] == baseline_counts["sha256"]


@pytest.fixture(scope="module")
def baseline_counts(tmp_path_factory, tiny_policy) -> dict[str, Any]:
    """Row counts of an uninterrupted round (computed once for the kill tests)."""
    from store import migrate
    from store.db import Database

    tmp = tmp_path_factory.mktemp("baseline")
    db = Database.from_url(f"sqlite:///{tmp / 'b.db'}")
    migrate.upgrade(db.engine)
    seed_prompts(db)
    runner = RoundRunner(db, runs_dir=tmp / "runs", progress=False)
    round_id = runner.start(make_config(tmp, tiny_policy))
    rnd = runner.run(round_id)
    out = {"counts": row_counts(db), "tasks": round_task_counts(db, round_id),
           "sha256": rnd.metrics["build_dataset"]["sha256"]}
    db.dispose()
    return out


def test_a_second_round_trains_from_the_promoted_policy_on_new_prompts(baseline, sqlite_db,
                                                                        tmp_path, tiny_policy):
    runner = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    rnd = runner.run(runner.start(make_config(tmp_path, tiny_policy)))
    first = baseline["round"]
    assert rnd.metrics["collect"]["policy_id"] == first.metrics["train"]["candidate_id"]
    assert rnd.metrics["collect"]["heldout_prompt_ids"] == \
        first.metrics["collect"]["heldout_prompt_ids"]
    assert rnd.metrics["generate"]["seed"] != first.metrics["generate"]["seed"]


def test_a_second_round_is_refused_while_one_is_unfinished(sqlite_db, tmp_path, tiny_policy):
    from store.errors import Conflict

    seed_prompts(sqlite_db)
    runner = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    config = make_config(tmp_path, tiny_policy)
    runner.start(config)
    with pytest.raises(Conflict, match="unfinished"):
        runner.start(config)


def test_a_round_held_by_a_live_process_is_not_resumed_twice(sqlite_db, tmp_path, tiny_policy):
    from store.errors import Conflict

    seed_prompts(sqlite_db)
    runner = RoundRunner(sqlite_db, runs_dir=tmp_path / "runs", progress=False)
    round_id = runner.start(make_config(tmp_path, tiny_policy))
    with sqlite_db.write() as session:
        # This process is alive, so its lease is respected until it expires.
        store_rounds.acquire_lock(session, holder=store_rounds.make_holder(), ttl_s=600)
    with pytest.raises(Conflict, match="another process runs a round"):
        runner.run(round_id)
