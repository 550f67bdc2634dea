"""Ensembles (pure vote + through the store), config files, and the `prefloop judge` CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from feedback.batch import run_judge
from feedback.config import (
    EnsembleConfig,
    LLMJudgeConfig,
    RuleJudgeConfig,
    load_judge_config,
)
from feedback.ensemble import vote
from feedback.tasks import TaskFilter
from store.db import Database
from store.errors import InvalidInput
from store.models import Annotator, Label, LabelStatus, Task
from tests.feedback.conftest import make_tasks
from tests.feedback.fault_server import FaultServer
from training.config_reader import ConfigError


def test_vote_majority_and_weighted() -> None:
    a, b = {"choice": "a"}, {"choice": "b"}
    d = vote("pairwise", [(a, 1.0), (a, 1.0), (b, 1.0)])
    assert d.value == a and d.confidence == pytest.approx(2 / 3) and d.route
    d = vote("pairwise", [(a, 1.0), (b, 3.0)])
    assert d.value == b and d.confidence == pytest.approx(0.75)
    d = vote("pairwise", [(a, 1.0), (b, 1.0), (None, 5.0)])
    assert d.value is None and d.details["reason"] == "no_majority" and d.route
    assert vote("binary", [(None, 1.0), (None, 1.0)]).details["reason"] == "no_valid_member"
    unanimous = vote("binary", [({"choice": "up"}, 1.0), ({"choice": "up"}, 2.0)])
    assert (unanimous.value, unanimous.confidence, unanimous.route) == ({"choice": "up"}, 1.0,
                                                                        False)
    ranks = vote("listwise", [({"ranks": [1, 2, 3]}, 1.0), ({"ranks": [2, 1, 3]}, 3.0)])
    # weighted mean ranks: 1.75, 1.25, 3 -> [2, 1, 3]; pair (0,1) share 3/4, others 1
    assert ranks.value == {"ranks": [2, 1, 3]}
    assert ranks.confidence == pytest.approx((0.75 + 1 + 1) / 3)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_configs_from_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "principles.txt").write_text("# comment\n- Be honest.\n- Be brief.\n")
    llm = load_judge_config(_write(tmp_path / "llm.toml", """
kind = "llm"
model = "smollm2"
base_url = "http://127.0.0.1:1/v1"
rubric = "default_v1"
constitution = ["Prefer safe answers."]
constitution_file = "principles.txt"
on_inconsistent = "human"
[limits]
concurrency = 3
timeout_s = 5
[routing]
priority = 4
"""))
    assert isinstance(llm, LLMJudgeConfig)
    assert llm.constitution == ("Prefer safe answers.", "Be honest.", "Be brief.")
    assert (llm.limits.concurrency, llm.limits.timeout_s, llm.routing.priority) == (3, 5, 4)
    assert llm.annotator_name == "ai:smollm2:default@1"
    rule = load_judge_config(_write(tmp_path / "rule.json", json.dumps({
        "kind": "rule", "name": "math", "version": "2",
        "checks": [{"type": "format"}, {"type": "answer_match", "mode": "numeric",
                                        "extract": "<answer>(.*?)</answer>", "weight": 2}]})))
    assert isinstance(rule, RuleJudgeConfig) and rule.annotator_name == "rule:math@2"
    ensemble = load_judge_config(_write(tmp_path / "ens.toml", """
kind = "ensemble"
name = "pair"
members = ["llm.toml", "rule.json"]
weights = [1, 2]
method = "weighted"
"""))
    assert isinstance(ensemble, EnsembleConfig) and ensemble.weights == (1.0, 2.0)
    overridden = load_judge_config(tmp_path / "llm.toml",
                                   overrides=["model=other", "limits.rate_limit_rps=2.5"])
    assert overridden.model == "other" and overridden.limits.rate_limit_rps == 2.5
    assert overridden.limits.concurrency == 3  # the rest of the section is kept


@pytest.mark.parametrize(("text", "message"), [
    ('model = "m"\ntemprature = 0.5', "unknown keys"),
    ('model = "m"\n[limits]\nconcurrency = 0', "concurrency"),
    ('model = "m"\nrubric = "nope_v9"', "not found"),
    ('model = "m"\non_inconsistent = "coin"', "on_inconsistent"),
    ('kind = "rule"\nname = "r"\nchecks = []', "at least one check"),
    ('kind = "telepathy"', "kind must be"),
])
def test_bad_configs_are_refused_with_the_field_named(tmp_path: Path, text: str,
                                                      message: str) -> None:
    from feedback.rubric import RubricError

    with pytest.raises((ConfigError, RubricError), match=message):
        load_judge_config(_write(tmp_path / "bad.toml", text))


def test_task_filter_parsing() -> None:
    f = TaskFilter.parse("kind=pairwise|binary,dataset=math,ids=3-9,limit=5,gold=1")
    assert (f.kinds, f.dataset, f.id_min, f.id_max, f.limit, f.gold_only) == (
        ("pairwise", "binary"), "math", 3, 9, 5, True)
    for bad in ("kind=triple", "colour=red", "limit=x", "kind"):
        with pytest.raises(InvalidInput):
            TaskFilter.parse(bad)


def test_ensemble_runs_members_then_votes(sqlite_db: Database, fault_server: FaultServer,
                                          tmp_path: Path) -> None:
    ids = make_tasks(sqlite_db, [("ok", "pairwise", [9, 1]), ("ok", "pairwise", [2, 8])],
                     reference="quality=9")
    _write(tmp_path / "llm.toml", f"""
model = "fault-judge"
base_url = "{fault_server.url}"
[limits]
timeout_s = 2
rate_limit_rps = 100
""")
    # "Has quality=9" rule: agrees with the LLM on task 1, says both_bad on task 2.
    _write(tmp_path / "rule.toml", """
kind = "rule"
name = "q9"
[[checks]]
type = "regex"
pattern = "quality=9"
""")
    config = load_judge_config(_write(tmp_path / "ens.toml", """
kind = "ensemble"
name = "duo"
members = ["llm.toml", "rule.toml"]
weights = [2, 1]
method = "weighted"
"""))
    stats = asyncio.run(run_judge(sqlite_db, config))
    assert stats.written == 2 and stats.routed == 1
    with sqlite_db.read() as session:
        ens = session.exec(select(Annotator).where(Annotator.name == "ensemble:duo@1")).one()
        labels = {lb.task_id: lb for lb in session.exec(
            select(Label).where(Label.annotator_id == ens.id))}
        assert labels[ids[0]].choice == "a" and labels[ids[0]].confidence == 1.0
        assert labels[ids[1]].choice == "b"  # LLM (weight 2) beats the rule's both_bad
        assert labels[ids[1]].confidence == pytest.approx(2 / 3)
        assert session.get(Task, ids[1]).priority == 10
        assert len(session.exec(select(Label)).all()) == 6  # 2 tasks x (2 members + ensemble)
    again = asyncio.run(run_judge(sqlite_db, config))
    assert again.written == 0 and again.requests == 0


def test_cli_judge_run_calibrate_list(tmp_path: Path, fault_server: FaultServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("PREFLOOP_DB_URL", db_url)
    monkeypatch.setenv("COLUMNS", "200")
    rows = [{"prompt": f"Q{i} [mode={'prose' if i == 3 else 'ok'}]", "kind": "pairwise",
             "completions": [f"x quality={9 - i}", f"y quality={i}"]} for i in range(4)]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = _write(tmp_path / "judge.toml", f"""
model = "fault-judge"
base_url = "{fault_server.url}"
[limits]
timeout_s = 2
rate_limit_rps = 100
""")
    runner = CliRunner()
    result = runner.invoke(cli.app, ["import", str(tmp_path / "tasks.jsonl"), "-f", "tasks"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.app, ["judge", "run", "--judge", str(judge), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "4 labels written of 4 pending (3 valid, 1 invalid" in result.output
    result = runner.invoke(cli.app, ["judge", "run", "--judge", str(judge), "--json"])
    assert json.loads(result.output)["tasks_pending"] == 0
    result = runner.invoke(cli.app, ["judge", "calibrate", "--judge", str(judge), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n_tasks"] == 0  # no human labels yet
    result = runner.invoke(cli.app, ["judge", "list"])
    assert "ai:fault-judge:default@1" in result.output
    result = runner.invoke(cli.app, ["judge", "run", "--judge", str(judge), "--tasks", "bad"])
    assert result.exit_code == 2
    db = Database.from_url(db_url)
    with db.read() as session:
        statuses = sorted(lb.status for lb in session.exec(select(Label)))
    assert statuses == [LabelStatus.invalid] + [LabelStatus.submitted] * 3
