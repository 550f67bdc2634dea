"""A Ray role killed during a PPO step: the step fails loudly (then --resume) or is replayed from
the last checkpoint, and the final weights and optimizer step counts equal those of an
uninterrupted run - no update skipped, none applied twice."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.rl.test_ppo_ray import TINY, same, tiny_rm, write_prompts  # noqa: F401 (fixture)

RUN = [*TINY, "steps=3", "freeze_actor_steps=0"]


def final_state(run_dir: Path) -> dict[str, Any]:
    from training.checkpoint import latest_checkpoint, load_state

    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-00000003"
    return load_state(latest)


def killer(step_to_kill: int, *, restart: bool) -> tuple[Any, dict[str, Any]]:
    """A phase hook that kills the critic's Ray actor once, at the start of the update of
    `step_to_kill`, and waits until Ray has registered the death (or the restart)."""
    import ray

    info: dict[str, Any] = {"killed": 0}

    def on_phase(step: int, phase: str, roles: Any) -> None:
        if step != step_to_kill or phase != "update" or info["killed"]:
            return
        handle = roles.critic
        old_pid = ray.get(handle.ping.remote())["pid"]
        ray.kill(handle, no_restart=not restart)
        info["killed"] += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ray.get(handle.ping.remote(), timeout=30)["pid"] != old_pid:
                    return  # restarted: a fresh process with a fresh (initial) state
            except ray.exceptions.RayActorError:
                if not restart:
                    return  # dead for good
            time.sleep(0.2)
        raise AssertionError("the critic neither died nor restarted")

    return on_phase, info


@pytest.fixture(scope="module")
def baseline(local_ray: None, tmp_path_factory: pytest.TempPathFactory, tiny_policy_dir: Path,
             tiny_rm: Path) -> dict[str, Any]:  # noqa: F811
    from training.ppo import run_ppo

    root = tmp_path_factory.mktemp("ppo-baseline")
    prompts = write_prompts(root / "prompts.jsonl")
    result = run_ppo(prompts=str(prompts), model=str(tiny_policy_dir),
                     reward_model=str(tiny_rm), out=str(root / "run"), overrides=RUN)
    return {"prompts": prompts, "state": final_state(result.run_dir)}


def assert_same_training(state: dict[str, Any], expected: dict[str, Any]) -> None:
    for role in ("actor", "critic"):
        assert state[role]["optimizer_steps"] == expected[role]["optimizer_steps"] == 3 * 2
        assert state[role]["applied_step"] == 3
        assert same(state[role]["trainable"], expected[role]["trainable"]), role
        # Adam's step counters too: an update applied twice would show here
        steps = [int(s["step"]) for s in state[role]["optimizer"]["state"].values()]
        assert steps and set(steps) == {6}


def test_killed_critic_fails_the_step_loudly_and_resume_matches_an_uninterrupted_run(
        baseline: dict[str, Any], tmp_path: Path, tiny_policy_dir: Path,
        tiny_rm: Path) -> None:  # noqa: F811
    from training.checkpoint import latest_checkpoint, load_state
    from training.ppo import PPOError, run_ppo

    out = tmp_path / "run"
    on_phase, info = killer(2, restart=False)
    kwargs: dict[str, Any] = {"prompts": str(baseline["prompts"]), "model": str(tiny_policy_dir),
                              "reward_model": str(tiny_rm), "out": str(out)}
    with pytest.raises(PPOError, match=r"failed during step 2 .*last complete checkpoint"):
        run_ppo(**kwargs, overrides=RUN, on_phase=on_phase)
    assert info["killed"] == 1
    latest = latest_checkpoint(out)
    assert latest is not None and latest.name == "step-00000001"
    kept = load_state(latest)
    assert kept["actor"]["optimizer_steps"] == kept["critic"]["optimizer_steps"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1]

    result = run_ppo(**kwargs, overrides=[*RUN, "resume=true"])
    assert result.steps == 3
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()] == [1, 2, 3]
    assert_same_training(final_state(out), baseline["state"])


def test_killed_critic_is_restarted_and_the_step_replayed_exactly(
        baseline: dict[str, Any], tmp_path: Path, tiny_policy_dir: Path,
        tiny_rm: Path) -> None:  # noqa: F811
    from training.ppo import run_ppo

    on_phase, info = killer(2, restart=True)
    result = run_ppo(prompts=str(baseline["prompts"]), model=str(tiny_policy_dir),
                     reward_model=str(tiny_rm), out=str(tmp_path / "run"),
                     overrides=[*RUN, "max_step_retries=1"], on_phase=on_phase)
    assert info["killed"] == 1 and result.steps == 3
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["retries"] == 1
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["actor/optimizer_steps"] for r in records] == [2, 4, 6]
    assert_same_training(final_state(result.run_dir), baseline["state"])
    assert torch.is_tensor(next(iter(final_state(result.run_dir)["actor"]["trainable"].values())))
