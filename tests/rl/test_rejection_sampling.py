"""Rejection sampling (best-of-n, then SFT on the best) end to end, with LoRA merged at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from online_helpers import TINY_OVERRIDES, max_weight_change, read_jsonl, word_reward

from training.online import run_online
from training.online_data import Group, PromptRow
from training.rejection_sampling import best_of_n


def _group(rewards: list[float]) -> Group:
    return Group(PromptRow("p", None, "1"), 0, [], rewards)


def test_best_of_n_picks_the_first_best_above_the_threshold() -> None:
    groups = [_group([0.1, 0.9, 0.9]), _group([0.2, 0.1]), _group([0.0, 0.0])]
    assert best_of_n(groups, min_reward=0.0) == [(0, 1), (1, 0), (2, 0)]
    assert best_of_n(groups, min_reward=0.15) == [(0, 1), (1, 0)]


def test_rejection_sampling_fine_tunes_on_the_best_samples(
        local_ray: None, tiny_policy_dir: Path, arithmetic_prompts_file: Path,
        tmp_path: Path) -> None:
    result = run_online(
        "rs", prompts=str(arithmetic_prompts_file), model=str(tiny_policy_dir),
        out=str(tmp_path / "run"), reward_fn=word_reward,
        overrides=[*TINY_OVERRIDES, "lora=on", "epochs_per_iteration=2", "train_batch_size=2",
                   "rs_min_reward=0.3", "learning_rate=1e-2"])
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    steps = 0
    for iteration, m in zip((1, 2), metrics, strict=True):
        batch = [s for s in samples if s["iteration"] == iteration]
        selected = [s for s in batch if s.get("selected")]
        # Exactly the best sample of each prompt whose best reward passes the threshold.
        for prompt_index in {s["prompt_index"] for s in batch}:
            group = [s for s in batch if s["prompt_index"] == prompt_index]
            best = max(s["reward"] for s in group)
            picked = [s for s in group if s.get("selected")]
            if best >= 0.3:
                assert len(picked) == 1 and picked[0]["reward"] == best
            else:
                assert picked == []
        assert m["train/examples"] == len(selected)
        assert m["train/steps"] == 2 * -(-len(selected) // 2)
        steps += int(m["train/steps"])
    assert result.steps == steps > 0
    # A full, merged model folder that loads on its own.
    assert (result.model_dir / "config.json").is_file()
    assert not (result.model_dir / "adapter_config.json").exists()
    assert max_weight_change(result.model_dir, tiny_policy_dir) > 0


def test_merge_adapter_writes_a_fresh_full_model_with_the_same_outputs(
        tiny_policy_dir: Path, tmp_path: Path, rl_tokenizer: Any) -> None:
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.models import ModelNotFoundError, merge_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert not (out / "adapter_config.json").exists()
    assert (out / "tokenizer_config.json").exists()  # taken from the base model's folder
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.tensor([rl_tokenizer("What is 3 + 4?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                              atol=1e-4)
    assert not any(".tmp" in p.name or p.name.startswith(".merged") for p in tmp_path.iterdir())
    with pytest.raises(ModelNotFoundError, match="not a LoRA adapter"):
        merge_adapter(tiny_policy_dir, tmp_path / "x")
