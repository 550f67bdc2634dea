"""Iterative online DPO (Xiong et al. 2024; Guo et al. 2024): one iteration's update.

K samples per prompt from the current policy, scored; pairs best-vs-worst (or all ordered pairs
with a large enough reward gap), DPO (training.losses.preference_loss) against the initial model
or the iteration's starting policy. The loop around it is training.online.

    prefloop train online-dpo --prompts prompts.jsonl --model smollm2-135m-instruct --out runs/od1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from training.learner import Learner
from training.online_config import OnlineConfig
from training.online_data import Group, chunks

if TYPE_CHECKING:
    import torch


def build_pairs(rewards: Sequence[float], how: Literal["best-worst", "all"],
                min_gap: float) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices of one prompt whose reward gap exceeds min_gap."""
    if how == "best-worst":
        best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
        worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
        return [(best, worst)] if rewards[best] - rewards[worst] > min_gap else []
    return [(a, b) for a in range(len(rewards)) for b in range(len(rewards))
            if rewards[a] - rewards[b] > min_gap]


def dpo_update(learner: Learner, groups: list[Group], config: OnlineConfig,
               sample_log: dict[tuple[int, int], dict[str, Any]]) -> dict[str, float]:
    """DPO (training.losses.preference_loss) on pairs built from the iteration's samples."""
    import torch

    from training.losses import preference_loss

    pairs = [(i, a, b) for i, g in enumerate(groups)
             for a, b in build_pairs(g.rewards, config.pairs, config.min_reward_gap)]
    stats = {"train/pairs": float(len(pairs)), "train/loss": 0.0, "train/grad_norm": 0.0,
             "train/accuracy": 0.0, "train/margin": 0.0, "train/steps": 0.0}
    if not pairs:
        return stats

    def tensors_of(items: Sequence[tuple[int, int, int]]) -> tuple[list[list[int]],
                                                                   list[list[int]]]:
        prompts = [groups[i].prompt_ids for i, _, _ in items]
        completions = [ids for i, a, b in items for ids in
                       (groups[i].rollouts[a].completion_ids, groups[i].rollouts[b].completion_ids)]
        return prompts, completions

    # Reference log-probs, once per iteration: the initial model, or the policy as it is now
    # (the iteration's starting point, before any update of this iteration).
    ref_sums: list[torch.Tensor] = []
    for micro in chunks(pairs, max(1, config.micro_batch_size // 2)):
        prompts, completions = tensors_of(micro)
        if config.reference == "initial":
            with learner.initial_policy() as reference:
                ref, _ = learner.logps(reference, prompts, completions, 1.0, grad=False)
        else:
            ref, _ = learner.logps(learner.model, prompts, completions, 1.0, grad=False)
        ref_sums.append(ref.sum(-1))
    ref_all = torch.cat(ref_sums).view(-1, 2)  # (pairs, [chosen, rejected])
    for k, (i, a, b) in enumerate(pairs):
        sample_log[(i, a)].setdefault("ref_logp", float(ref_all[k, 0]))
        sample_log[(i, b)].setdefault("ref_logp", float(ref_all[k, 1]))

    per_step = len(pairs) if config.train_batch_size == 0 else config.train_batch_size
    order = list(range(len(pairs)))
    totals = {"loss": 0.0, "norm": 0.0, "accuracy": 0.0, "margin": 0.0}
    steps = 0
    for _epoch in range(config.epochs_per_iteration):
        for step_items in chunks(order, per_step):
            for micro in chunks(step_items, max(1, config.micro_batch_size // 2)):
                items = [pairs[k] for k in micro]
                prompts, completions = tensors_of(items)
                logp, mask = learner.logps(learner.model, prompts, completions, 1.0, grad=True)
                sums, lengths = logp.sum(-1).view(-1, 2), mask.sum(-1).view(-1, 2)
                ref = ref_all[list(micro)]
                losses = preference_loss(
                    config.loss_type,  # type: ignore[arg-type]
                    chosen_logps=sums[:, 0], rejected_logps=sums[:, 1],
                    ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1],
                    chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                    beta=config.beta)
                loss = losses.sum() / len(step_items)
                loss.backward()
                margin = config.beta * ((sums[:, 0] - ref[:, 0]) - (sums[:, 1] - ref[:, 1]))
                totals["loss"] += float(loss.detach())
                totals["accuracy"] += float((margin > 0).float().sum()) / len(step_items)
                totals["margin"] += float(margin.detach().sum()) / len(step_items)
            totals["norm"] += learner.step()
            steps += 1
    stats.update({"train/loss": totals["loss"] / steps, "train/grad_norm": totals["norm"] / steps,
                  "train/accuracy": totals["accuracy"] / steps,
                  "train/margin": totals["margin"] / steps, "train/steps": float(steps)})
    return stats


__all__ = ["build_pairs", "dpo_update"]
