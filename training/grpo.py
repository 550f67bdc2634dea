"""GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1; DeepSeek-AI 2025, R1): one iteration's update.

G samples per prompt, group-normalised advantages (optionally without the std, Dr. GRPO), PPO's
clipped ratio, a KL term to the reference, no critic; the math is training.rl_losses. The loop
around it (rollouts, rewards, weight sync) is training.online.

    prefloop train grpo --prompts prompts.jsonl --model smollm2-135m-instruct --out runs/grpo1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from training.learner import Learner
from training.online_config import OnlineConfig
from training.online_data import Group, chunks

if TYPE_CHECKING:
    import torch


def grpo_update(learner: Learner, groups: list[Group], config: OnlineConfig,
                sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """Clipped, group-relative policy updates on one iteration's groups (no critic).

    Shao et al. 2024, Eq. 3 with outcome supervision (Sec. 4.1.2): every token of sample i gets
    the advantage A_i of its group; the KL to the reference uses the k3 estimator (Eq. 4).
    """
    import torch

    from training.rl_losses import clipped_policy_loss, group_advantages, kl_penalty

    G = config.samples_per_prompt
    rewards = torch.tensor([r for g in groups for r in g.rewards])
    advantages = group_advantages(rewards, G, scale_by_std=config.scale_rewards).view(-1, G)
    kept = [i for i, g in enumerate(groups)
            if not (config.skip_uniform_groups and max(g.rewards) == min(g.rewards))]
    stats = {"train/groups_used": float(len(kept)), "train/loss": 0.0, "train/kl": 0.0,
             "train/clip_fraction": 0.0, "train/grad_norm": 0.0, "train/steps": 0.0}
    if not kept:
        return stats
    groups_per_micro = max(1, config.micro_batch_size // G)
    groups_per_step = len(kept) if config.train_batch_size == 0 else max(
        1, config.train_batch_size // G)
    single_pass = config.epochs_per_iteration == 1 and groups_per_step >= len(kept)

    def tensors_of(indices: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        prompts = [groups[i].prompt_ids for i in indices]
        completions = [r.completion_ids for i in indices for r in groups[i].rollouts]
        return prompts, completions

    def stacked(key: str, indices: Sequence[int], width: int) -> torch.Tensor:
        # Fixed log-probs were computed in other micro-batches (other padding): re-pad.
        out = torch.zeros((len(indices) * G, width))
        for k, i in enumerate(indices):
            values = fixed[i][key][:, :width]
            out[k * G : (k + 1) * G, : values.shape[1]] = values
        return out

    # Log-probs that stay fixed during the iteration's updates: the reference's and, when the
    # batch is used for more than one optimizer step, the sampling policy's ("old") ones.
    fixed: dict[int, dict[str, torch.Tensor]] = {i: {} for i in kept}
    temperature = config.temperature
    for micro in chunks(kept, groups_per_micro):
        prompts, completions = tensors_of(micro)
        if config.kl_coef > 0:
            with learner.initial_policy() as reference:
                ref, _ = learner.logps(reference, prompts, completions, temperature, grad=False)
            for k, i in enumerate(micro):
                fixed[i]["ref"] = ref[k * G : (k + 1) * G]
        if not single_pass:
            old, _ = learner.logps(learner.model, prompts, completions, temperature, grad=False)
            for k, i in enumerate(micro):
                fixed[i]["old"] = old[k * G : (k + 1) * G]

    totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "norm": 0.0, "tokens": 0.0}
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_groups in chunks(kept, groups_per_step):
            step_tokens = sum(len(r.completion_ids) for i in step_groups
                              for r in groups[i].rollouts)
            step_sequences = len(step_groups) * G
            for micro in chunks(step_groups, groups_per_micro):
                prompts, completions = tensors_of(micro)
                logp, mask = learner.logps(learner.model, prompts, completions, temperature,
                                           grad=True)
                width = logp.shape[1]
                old = logp.detach() if single_pass else stacked("old", micro, width)
                adv = torch.cat([advantages[i] for i in micro]).unsqueeze(1).expand_as(logp)
                loss, clip_fraction = clipped_policy_loss(logp, old, adv, mask, config.clip_eps,
                                                          reduction=config.loss_reduction)
                kl_value = torch.zeros(())
                if config.kl_coef > 0:
                    ref = stacked("ref", micro, width)
                    per_token_kl = kl_penalty(logp, ref, config.kl_estimator)
                    if config.loss_reduction == "token":
                        kl_value = (per_token_kl * mask).sum() / mask.sum().clamp(min=1)
                    else:
                        kl_value = ((per_token_kl * mask).sum(-1)
                                    / mask.sum(-1).clamp(min=1)).mean()
                    loss = loss + config.kl_coef * kl_value
                # Each micro-batch's mean is re-weighted by its share of the optimizer batch, so
                # accumulation gives the gradient of the mean over the whole batch.
                share = (float(mask.sum()) / step_tokens if config.loss_reduction == "token"
                         else len(completions) / step_sequences)
                (loss * share).backward()
                totals["loss"] += float(loss.detach()) * share
                totals["kl"] += float(kl_value.detach()) * share
                totals["clip"] += float(clip_fraction) * share
                if _epoch == 0:  # what the learner saw, per sample, for the samples log
                    for k, i in enumerate(micro):
                        for j in range(G):
                            record = sample_log[(i, j)]
                            record["advantage"] = float(advantages[i, j])
                            record["learner_logp"] = float(logp[k * G + j].detach().sum())
                            if "ref" in fixed[i]:
                                record["ref_logp"] = float(fixed[i]["ref"][j].sum())
            totals["norm"] += learner.step()
            steps += 1
    stats.update({"train/loss": totals["loss"] / steps, "train/kl": totals["kl"] / steps,
                  "train/clip_fraction": totals["clip"] / steps,
                  "train/grad_norm": totals["norm"] / steps, "train/steps": float(steps)})
    return stats


__all__ = ["grpo_update"]
