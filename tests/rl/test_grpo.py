"""GRPO end to end on a tiny model with the rollout engine in a local Ray actor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from online_helpers import (
    TINY_OVERRIDES,
    max_weight_change,
    read_jsonl,
    sequence_logp,
    word_reward,
)

from training.config_reader import ConfigError
from training.online import run_online
from training.online_config import load_online_config
from training.online_data import OnlineDataError, prompt_order, read_prompts


def test_grpo_runs_end_to_end_on_ray(local_ray: None, tiny_policy_dir: Path,
                                     arithmetic_prompts_file: Path, tmp_path: Path,
                                     rl_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    seen: list[int] = []
    result = run_online(
        "grpo", prompts=str(arithmetic_prompts_file), model=str(tiny_policy_dir),
        out=str(tmp_path / "run"), reward_fn=word_reward,
        overrides=[*TINY_OVERRIDES, "lora=off", "kl_coef=0.1", "temperature=1.0"],
        on_iteration=lambda i, m: seen.append(i))
    assert seen == [1, 2]
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    # One optimizer step per iteration (all groups in one batch, one epoch).
    assert [m["train/steps"] for m in metrics] == [1.0, 1.0]
    assert result.steps == 2
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    assert len(samples) == 2 * 4 * 4
    prompts = {i: row for i, row in enumerate(read_prompts(str(arithmetic_prompts_file)))}
    # The logged reward is the reward function of the logged text.
    texts = [s["text"] for s in samples]
    assert [s["reward"] for s in samples] == word_reward([], texts, [])
    for iteration in (1, 2):
        rewards = [s["reward"] for s in samples if s["iteration"] == iteration]
        mean = metrics[iteration - 1]["rollout/reward_mean"]
        assert mean == pytest.approx(sum(rewards) / len(rewards))
    # Advantages are zero-mean per group.
    for iteration in (1, 2):
        for prompt_index in {s["prompt_index"] for s in samples if s["iteration"] == iteration}:
            group = [s for s in samples if s["iteration"] == iteration
                     and s["prompt_index"] == prompt_index]
            if "advantage" in group[0]:
                assert sum(s["advantage"] for s in group) == pytest.approx(0.0, abs=1e-4)
    # Weight sync: the actor's log-probs of its own samples equal the learner's, in iteration 2
    # too (sampled after the first update was pushed).
    used = [s for s in samples if "learner_logp" in s]
    assert {s["iteration"] for s in used} == {1, 2}
    for s in used:
        assert s["rollout_logp"] == pytest.approx(s["learner_logp"], abs=2e-3)
    # The reference stayed the initial model: its logged log-probs are the initial model's.
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    late = [s for s in used if s["iteration"] == 2]
    for s in late[:4]:
        expected = sequence_logp(initial, rl_tokenizer, prompts[s["prompt_index"]].prompt,
                                 s["completion_ids"])
        assert s["ref_logp"] == pytest.approx(expected, abs=2e-3)
    assert any(abs(s["learner_logp"] - s["ref_logp"]) > 1e-3 for s in late)  # policy moved
    assert max_weight_change(result.model_dir, tiny_policy_dir) > 0
    assert (result.run_dir / "config.json").is_file()
    assert result.metrics["step"] == 2.0
    # Short prompts + max_new_tokens on CPU: the learner ran eager attention while the rollout
    # engine ran sdpa, and the log-prob agreement above holds across the two kernels.
    assert json.loads((result.run_dir / "run.json").read_text())["attention"] == "eager"


def test_grpo_without_kl_and_several_updates_per_iteration(
        local_ray: None, tiny_policy_dir: Path, arithmetic_prompts_file: Path,
        tmp_path: Path) -> None:
    result = run_online(
        "grpo", prompts=str(arithmetic_prompts_file), model=str(tiny_policy_dir),
        out=str(tmp_path / "run"), reward_fn=word_reward,
        overrides=[*TINY_OVERRIDES, "lora=on", "kl_coef=0", "epochs_per_iteration=2",
                   "train_batch_size=8", "micro_batch_size=4", "scale_rewards=false",
                   "iterations=1", "learning_rate=5e-3"])
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")[0]
    groups = int(metrics["train/groups_used"])
    expected_steps = 2 * -(-groups // 2)  # 2 epochs x ceil(groups / 2 groups per step)
    assert result.steps == expected_steps == metrics["train/steps"]
    assert "ref_logp" not in read_jsonl(result.run_dir / "samples.jsonl")[0]
    assert not (result.model_dir / "adapter_config.json").exists()
    assert max_weight_change(result.model_dir, tiny_policy_dir) > 0


def test_bad_inputs_fail_before_any_model_is_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(OnlineDataError, match=r"bad\.jsonl:2"):
        read_prompts(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(OnlineDataError, match=":1: not JSON"):
        read_prompts(str(bad))
    with pytest.raises(OnlineDataError, match="does not exist"):
        run_online("grpo", prompts=str(tmp_path / "none.jsonl"), model="m",
                   out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    base = ["prompts=p", "model=m", "out=o"]
    with pytest.raises(ConfigError, match="unknown config key"):
        load_online_config("grpo", None, [*base, "kl_coeff=1"])
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_online_config("grpo", None, [*base, "samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_online_config("rs", None, [*base, "iterations=two"])
    with pytest.raises(ConfigError, match="algo"):
        load_online_config("ppo", None, base)
    config = load_online_config("online-dpo", None, [*base, "stop=</answer>"])
    assert config.stop == ("</answer>",) and config.algo == "online-dpo"


def test_prompt_order_visits_every_prompt_once_per_pass() -> None:
    order = prompt_order(5, seed=3)
    first, second = [next(order) for _ in range(5)], [next(order) for _ in range(5)]
    assert sorted(first) == sorted(second) == list(range(5))
    again = prompt_order(5, seed=3)
    assert [next(again) for _ in range(5)] == first
