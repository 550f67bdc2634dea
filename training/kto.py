"""KTO (offline): the loss of one micro-batch of unpaired thumbs-up / thumbs-down completions.

`prefloop train kto` (Ethayarajh et al. 2024, Eq. 8; training.losses.kto_loss): each completion
is pushed above or below the reference point z0, the batch's KL estimate from mismatched
(prompt, completion) pairs. In a multi-process run z0 is summed over the ranks' shards so it
equals the single-process value.

    prefloop train kto --data labels.jsonl --model smollm2-135m-instruct --out runs/kto1
"""

from __future__ import annotations

from typing import Any, cast

import torch

from training import losses
from training.config import TrainConfig
from training.data import CompletionExample
from training.data_parallel import Ranks, sum_over_ranks
from training.offline_batch import MicroBatch, Reference, sequence_logps


def micro_batch_loss(config: TrainConfig, model: Any, batch: MicroBatch, reference: Reference,
                     *, ranks: Ranks | None = None, filler: bool = False
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The KTO loss of `batch`, divided by its normaliser, and summed statistics.

    filler: this rank has no example in the micro-batch; `batch` is a stand-in whose share of z0
    is zero (the caller zeroes its loss).
    """
    device, pad_id = batch.device, batch.pad_id
    items = cast(list[CompletionExample], batch.examples)
    prompts = [ex.prompt_ids for ex in items]
    own = [ex.completion_ids for ex in items]
    mismatched = [ex.kl_completion_ids for ex in items]
    logps, _ = sequence_logps(model, prompts, own, pad_id, device)
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, prompts, mismatched, pad_id, device)
    if reference.table is not None:
        ref = reference.table["completion"][batch.indices].to(device)
        ref_kl = reference.table["kl"][batch.indices].to(device)
    else:
        with torch.no_grad(), reference.policy_as_reference(model) as ref_model:
            ref, _ = sequence_logps(ref_model, prompts, own, pad_id, device)
            ref_kl, _ = sequence_logps(ref_model, prompts, mismatched, pad_id, device)
    if ranks is not None and ranks.distributed:
        # z0 is the mean over the whole micro-batch, not over this rank's shard of it.
        kl_sum, count = sum_over_ranks(
            [0.0, 0.0] if filler else [float((kl_logps - ref_kl).sum()), float(len(items))],
            ranks)
        z0 = torch.tensor(kl_sum / count, device=device).clamp(min=0)
    else:
        z0 = losses.kto_reference_point(kl_logps, ref_kl)
    desirable = torch.tensor([ex.desirable for ex in items], device=device)
    per_example = losses.kto_loss(logps, ref, desirable, z0, config.beta,
                                  config.desirable_weight, config.undesirable_weight)
    rewards = config.beta * (logps - ref).detach()
    correct = torch.where(desirable, rewards > config.beta * z0, rewards < config.beta * z0)
    stats = {
        "rewards/accuracy": float(correct.float().sum()),
        "rewards/margin": float(torch.where(desirable, rewards, -rewards).sum()),
        "kl": float(z0) * len(items),
        "tokens": float(sum(len(e.prompt_ids) + len(e.completion_ids) for e in items)),
    }
    return (per_example * batch.weights).sum() / batch.normaliser, stats


__all__ = ["micro_batch_loss"]
