"""Reward-model training (offline): the loss of one micro-batch of pairs or rankings.

`prefloop train rm`: a scalar head on the transformer, read at each sequence's last token
(training.logprobs.sequence_rewards), trained with the Bradley-Terry pairwise loss (InstructGPT,
Ouyang et al. 2022, Eq. 1; optional Llama 2 margins) or the Plackett-Luce listwise loss on K-way
rankings; the equations are the pure functions of training.losses.

    prefloop train rm --data prefs.jsonl --model smollm2-135m-instruct --out runs/rm1
"""

from __future__ import annotations

from typing import Any, cast

import torch

from training import losses
from training.config import TrainConfig
from training.data import ListExample, PairExample, collate_lists, collate_pairs
from training.logprobs import sequence_rewards
from training.offline_batch import MicroBatch


def micro_batch_loss(config: TrainConfig, model: Any, batch: MicroBatch
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward-model loss of `batch`, divided by its normaliser, and summed statistics."""
    if config.loss_type == "bradley_terry":
        return _pairwise_loss(model, batch)
    return _listwise_loss(model, batch)


def _pairwise_loss(model: Any, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    device = batch.device
    pairs = cast(list[PairExample], batch.examples)
    tensors = {k: v.to(device) for k, v in collate_pairs(pairs, batch.pad_id).items()}
    rewards = sequence_rewards(model, tensors["input_ids"], tensors["attention_mask"])
    r_c, r_r = rewards.chunk(2)
    margins = torch.tensor([ex.margin for ex in pairs], device=device)
    per_pair = losses.bradley_terry_loss(r_c, r_r, margins if bool(margins.any()) else None)
    stats = {
        "rewards/accuracy": float((r_c > r_r).float().sum()),
        "rewards/margin": float((r_c - r_r).detach().sum()),
        "tokens": float(tensors["attention_mask"].sum()),
    }
    return (per_pair * batch.weights).sum() / batch.normaliser, stats


def _listwise_loss(model: Any, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    device = batch.device
    lists = cast(list[ListExample], batch.examples)
    tensors = {k: v.to(device) for k, v in collate_lists(lists, batch.pad_id).items()}
    flat = sequence_rewards(model, tensors["input_ids"], tensors["attention_mask"])
    valid, list_ranks = tensors["list_valid"], tensors["ranks"]
    rewards = torch.zeros(valid.shape, device=device, dtype=flat.dtype)
    rewards = rewards.masked_scatter(valid, flat)  # (B, K), row-major like the flat order
    per_list = losses.plackett_luce_loss(rewards, list_ranks, valid)
    # Pairwise view for logging: every (better, worse) pair of each list.
    better = ((list_ranks.unsqueeze(2) < list_ranks.unsqueeze(1)) & valid.unsqueeze(1)
              & valid.unsqueeze(2))
    diff = (rewards.unsqueeze(2) - rewards.unsqueeze(1)).detach()
    n_pairs = better.sum(dim=(1, 2)).clamp(min=1)
    stats = {
        "rewards/accuracy": float((((diff > 0) & better).sum(dim=(1, 2)) / n_pairs).sum()),
        "rewards/margin": float(((diff * better).sum(dim=(1, 2)) / n_pairs).sum()),
        "tokens": float(tensors["attention_mask"].sum()),
    }
    return (per_list * batch.weights).sum() / batch.normaliser, stats


__all__ = ["micro_batch_loss"]
