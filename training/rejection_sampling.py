"""Rejection sampling (best-of-n, as in Llama 2, Touvron et al. 2023, Sec. 3.2.3): one update.

n samples per prompt, the best one kept if its reward is high enough, supervised fine-tuning
(completion-only NLL, training.losses.sft_loss) on the kept ones. The loop around it is
training.online.

    prefloop train rs --prompts prompts.jsonl --model smollm2-135m-instruct --out runs/rs1
"""

from __future__ import annotations

from typing import Any

from training.learner import Learner
from training.online_config import OnlineConfig
from training.online_data import Group, chunks


def best_of_n(groups: list[Group], min_reward: float) -> list[tuple[int, int]]:
    """(group, sample) of each prompt's highest-reward sample (first on ties), if >= min_reward."""
    chosen = []
    for i, group in enumerate(groups):
        best = max(range(len(group.rewards)), key=lambda j: (group.rewards[j], -j))
        if group.rewards[best] >= min_reward:
            chosen.append((i, best))
    return chosen


def rs_update(learner: Learner, groups: list[Group], config: OnlineConfig,
              sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """Supervised fine-tuning on the best sample of each prompt (completion-only NLL)."""
    from training.losses import sft_loss

    chosen = best_of_n(groups, config.rs_min_reward)
    for i, j in chosen:
        sample_log[(i, j)]["selected"] = True
    stats = {"train/examples": float(len(chosen)), "train/loss": 0.0, "train/grad_norm": 0.0,
             "train/steps": 0.0}
    if not chosen:
        return stats
    per_step = len(chosen) if config.train_batch_size == 0 else config.train_batch_size
    loss_sum = norm_sum = 0.0
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_items in chunks(chosen, per_step):
            step_tokens = sum(len(groups[i].rollouts[j].completion_ids) for i, j in step_items)
            step_loss = 0.0
            for micro in chunks(step_items, config.micro_batch_size):
                prompts = [groups[i].prompt_ids for i, _ in micro]
                completions = [groups[i].rollouts[j].completion_ids for i, j in micro]
                logp, mask = learner.logps(learner.model, prompts, completions, 1.0, grad=True)
                loss = sft_loss(logp, mask, num_tokens=float(step_tokens))
                loss.backward()
                step_loss += float(loss.detach())
            norm_sum += learner.step()
            loss_sum += step_loss
            steps += 1
    stats.update({"train/loss": loss_sum / steps, "train/grad_norm": norm_sum / steps,
                  "train/steps": float(steps)})
    return stats


__all__ = ["best_of_n", "rs_update"]
