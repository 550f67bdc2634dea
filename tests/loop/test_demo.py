"""`prefloop demo`: the loop headless, with the AI judge served by the app's own /v1 endpoint.

The quick test runs two rounds on a tiny model (the AI judge is the deployed tiny model: its
verdicts are noise, stored as invalid or valid labels with the judge identity of the version
that served). The slow test is the README's command on the bundled SmolLM2: three rounds, and
the deployed policy's held-out reward must go up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from loop.config import CONFIG_DIR, load_round_config
from loop.demo import deployed_rewards, run_demo
from store.models import Annotator, AnnotatorKind, Label
from tests.loop.test_runner import (  # noqa: F401  (tiny_policy is a fixture)
    make_config,
    seed_prompts,
    tiny_policy,
)

pytest.importorskip("uvicorn")

RULE_NAME = "rule:capital-start@1"
AI_JUDGE = """kind = "llm"
model = "deployed"
structured_output = "off"
logprobs = false
max_tokens = 16
task_kinds = ["pairwise"]
[limits]
concurrency = 1
timeout_s = 60
max_retries = 1
"""


def test_demo_runs_rounds_with_the_ai_judge_on_the_apps_own_endpoint(
        sqlite_db, tmp_path, tiny_policy, capsys):  # noqa: F811
    from app.settings import get_settings

    seed_prompts(sqlite_db)
    ai = tmp_path / "ai.toml"
    ai.write_text(AI_JUDGE)
    config = make_config(tmp_path, tiny_policy)
    import dataclasses

    config = dataclasses.replace(
        config, label=dataclasses.replace(config.label, judges=(*config.label.judges, str(ai)),
                                          ai_task_limit=2, calibrate_against=RULE_NAME),
        evaluate=dataclasses.replace(config.evaluate, ai_task_limit=1))
    settings = get_settings(db_url=sqlite_db.url, serving_smoke_max_tokens=2,
                            serving_poll_interval_s=0.2)
    result = run_demo(sqlite_db, config, rounds=2, runs_dir=tmp_path / "runs",
                      settings=settings, log=lambda _m: None)
    assert [s.state for s in result.summaries] == ["promoted", "promoted"]
    assert result.plot.exists() and result.plot.stat().st_size > 10_000
    output = capsys.readouterr().out
    assert "win rate vs previous" in output and "round 2 of 2" in output
    assert "AI = rule (decisive)" in output and "routed to humans" in output
    for summary in result.summaries:
        # Every AI call produced a stored label (valid or invalid), at most ai_task_limit.
        assert summary.labels["ai"] + summary.labels["ai_invalid"] == 2
        # Calibrated live against the rule judge on the two tasks both labelled.
        (calibration,) = summary.ai_calibration.values()
        assert (calibration["reference"], calibration["n_tasks"]) == (RULE_NAME, 2)
        assert calibration["n_compared"] == summary.labels["ai"]
        assert isinstance(summary.routed, int) and 0 <= summary.routed <= 2
    with sqlite_db.read() as session:
        judges = session.exec(select(Annotator.name).where(
            Annotator.kind == AnnotatorKind.ai).order_by(Annotator.id)).all()
        ai_labels = session.exec(select(Label).join(
            Annotator, Annotator.id == Label.annotator_id).where(
            Annotator.kind == AnnotatorKind.ai)).all()
    # Round 1 was judged by the base version, round 2 by round 1's promoted candidate.
    base = Path(str(tiny_policy)).name
    assert [j.split(":")[1] for j in judges][:2] in ([str(tiny_policy), "round-1"],
                                                      [base, "round-1"])
    assert len(ai_labels) == 2 * 2 + 2 * 1


@pytest.mark.slow
@pytest.mark.demo
def test_the_readme_demo_improves_held_out_reward_over_three_rounds(sqlite_db, tmp_path):
    config = load_round_config(CONFIG_DIR / "demo.toml")
    result = run_demo(sqlite_db, config, rounds=3, runs_dir=tmp_path / "runs")
    rewards = deployed_rewards(result.summaries)
    assert rewards[-1] is not None and rewards[0] is not None
    assert rewards[-1] > rewards[0] + 0.1
    assert any(s.state == "promoted" for s in result.summaries)
