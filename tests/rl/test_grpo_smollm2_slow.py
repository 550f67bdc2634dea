"""GRPO on the bundled SmolLM2-135M-Instruct (slow: a real model, a real Ray actor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from online_helpers import read_jsonl

from training.online import run_online
from training.rewards import make_reward
from training.tasks import make_arithmetic_prompts


@pytest.mark.slow
def test_grpo_on_smollm2_scores_tagged_answers_and_syncs_weights(local_ray: None,
                                                                 tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = make_arithmetic_prompts(4, seed=0, split="train")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_online(
        "grpo", prompts=str(prompts), model="smollm2-135m-instruct", out=str(tmp_path / "run"),
        overrides=["iterations=2", "prompts_per_iteration=2", "samples_per_prompt=6",
                   "max_new_tokens=24", "precision=fp32", "rollout_dtype=float32",
                   "skip_uniform_groups=false", "progress=false"])
    assert result.steps == 2
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    assert len(samples) == 2 * 2 * 6
    reward = make_reward("rule:format+accuracy")
    texts = [s["text"] for s in samples]
    assert [s["reward"] for s in samples] == reward(texts, texts, [s["answer"] for s in samples])
    # The model follows the one-shot example often enough for the rule reward to see it.
    assert any(s["reward"] > 0 for s in samples)
    assert any(s["text"].endswith("</answer>") for s in samples)
    for s in samples:  # actor and learner agree on every sample, after the sync too
        assert s["rollout_logp"] == pytest.approx(s["learner_logp"], abs=5e-3)
    assert (result.model_dir / "config.json").is_file()
    assert not (result.model_dir / "adapter_config.json").exists()
