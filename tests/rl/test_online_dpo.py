"""Iterative online DPO end to end: pairs from the policy's own samples, reference choices."""

from __future__ import annotations

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

from training.online import run_online
from training.online_data import read_prompts
from training.online_dpo import build_pairs


def test_pairs_best_vs_worst_and_all_ordered_pairs() -> None:
    assert build_pairs([0.5, 1.0, 0.0, 1.0], "best-worst", 0.0) == [(1, 2)]
    assert build_pairs([0.5, 0.5], "best-worst", 0.0) == []
    assert build_pairs([0.2, 1.0, 0.0], "all", 0.0) == [(0, 2), (1, 0), (1, 2)]
    assert build_pairs([0.2, 1.0, 0.0], "all", 0.5) == [(1, 0), (1, 2)]


@pytest.mark.parametrize("reference", ["initial", "round-start"])
def test_online_dpo_runs_end_to_end(local_ray: None, tiny_policy_dir: Path,
                                    arithmetic_prompts_file: Path, tmp_path: Path,
                                    rl_tokenizer: Any, reference: str) -> None:
    from transformers import AutoModelForCausalLM

    result = run_online(
        "online-dpo", prompts=str(arithmetic_prompts_file), model=str(tiny_policy_dir),
        out=str(tmp_path / "run"), reward_fn=word_reward,
        overrides=[*TINY_OVERRIDES, "lora=on", f"reference={reference}", "pairs=all",
                   "epochs_per_iteration=2", "train_batch_size=0", "learning_rate=1e-2"])
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    for iteration, m in zip((1, 2), metrics, strict=True):
        batch = [s for s in samples if s["iteration"] == iteration]
        expected_pairs = 0
        for prompt_index in {s["prompt_index"] for s in batch}:
            rewards = [s["reward"] for s in batch if s["prompt_index"] == prompt_index]
            expected_pairs += len(build_pairs(rewards, "all", 0.0))
        assert m["train/pairs"] == expected_pairs > 0
        assert m["train/steps"] == 2  # all pairs in one step, 2 epochs
    assert result.steps == 4
    assert [s["reward"] for s in samples] == word_reward([], [s["text"] for s in samples], [])
    prompts = read_prompts(str(arithmetic_prompts_file))
    initial = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    late = [s for s in samples if s["iteration"] == 2 and "ref_logp" in s][:4]
    assert late
    for s in late:
        initial_logp = sequence_logp(initial, rl_tokenizer, prompts[s["prompt_index"]].prompt,
                                     s["completion_ids"])
        if reference == "initial":  # the base model with the adapter off, all along
            assert s["ref_logp"] == pytest.approx(initial_logp, abs=2e-3)
        else:  # the policy after iteration 1 - no longer the initial model
            assert s["rollout_logp"] == pytest.approx(s["ref_logp"], abs=2e-3)
    if reference == "round-start":
        assert any(abs(s["ref_logp"] - sequence_logp(initial, rl_tokenizer,
                                                     prompts[s["prompt_index"]].prompt,
                                                     s["completion_ids"])) > 1e-3
                   for s in late)
    assert max_weight_change(result.model_dir, tiny_policy_dir) > 0
