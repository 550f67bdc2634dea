"""PPO on the bundled SmolLM2-135M-Instruct (slow): LoRA actor and critic, a rule reward on the
seeded arithmetic task, both colocations, a few short iterations on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow


def test_ppo_on_smollm2_with_lora_and_a_rule_reward(local_ray: None, tmp_path: Path) -> None:
    import ray
    from transformers import AutoModelForCausalLM

    from training.ppo import run_ppo
    from training.tasks import make_arithmetic_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n"
                               for r in make_arithmetic_prompts(8, seed=0, split="train")))
    seen: dict[str, Any] = {"actor": {}, "ref": {}}

    def on_phase(step: int, phase: str, roles: Any) -> None:
        if phase == "done":
            seen["actor"][step] = ray.get(roles.actors[0].call.remote("actor", "trainable_state"))
            if step in (1, 2):
                seen["ref"][step] = ray.get(roles.ref_for(0).call.remote("ref",
                                                                         "parameters_state"))
            seen["count"] = roles.ray_actor_count

    result = run_ppo(
        prompts=str(prompts), model="smollm2-135m-instruct", reward_model=None,
        out=str(tmp_path / "run"), colocate=["actor,ref", "critic,reward"],
        overrides=["reward=rule:format+accuracy", "steps=2", "rollout_batch_size=2",
                   "samples_per_prompt=2", "mini_batch_size=4", "max_new_tokens=16",
                   "lora=on", "actor_lr=1e-4", "critic_lr=1e-3", "progress=false",
                   "save_steps=0", "cpus_per_worker=1"],
        on_phase=on_phase)
    assert result.steps == 2 and seen["count"] == 2
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["ppo/score"] <= 1.0 for r in records)  # rule rewards are in [0, 1]
    # LoRA's B starts at 0: at step 1 the actor *is* the reference, the KL is exactly 0
    first = torch.load(result.run_dir / "rollouts" / "step-00000001.pt")
    assert float(first["kl"].abs().max()) < 1e-5
    lora_b = [k for k in seen["actor"][1] if "lora_B" in k]
    assert lora_b and all(float(seen["actor"][1][k].abs().max()) > 0 for k in lora_b)
    assert all(torch.equal(seen["ref"][1][k], seen["ref"][2][k]) for k in seen["ref"][1])
    # the final model is a full (merged) Hugging Face folder
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (result.model_dir / "tokenizer_config.json").is_file()
