"""DPO and its variants (offline): the loss of one micro-batch of preference pairs.

`prefloop train dpo` with loss_type sigmoid (Rafailov et al. 2023, Eq. 7), ipo, hinge, cdpo,
robust, simpo, rdpo or orpo; the equations are the pure functions of training.losses. Chosen and
rejected completions go through the policy in one forward pass (or, with share_prompt, the prompt
once through the KV cache); reference log-probs come from the precomputed table or a reference
model run per step (training.offline_batch.Reference).

    prefloop train dpo --data prefs.jsonl --model smollm2-135m-instruct --out runs/dpo1
"""

from __future__ import annotations

from typing import Any, cast

import torch

from training import losses
from training.config import TrainConfig
from training.data import PairExample
from training.loss_names import PreferenceLossType
from training.offline_batch import MicroBatch, Reference, pair_logps


def shares_prompt(config: TrainConfig) -> bool:
    """Whether pairs run their prompt once (gradient checkpointing disables the KV cache)."""
    return config.share_prompt and not config.gradient_checkpointing


def micro_batch_loss(config: TrainConfig, model: Any, batch: MicroBatch, reference: Reference
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO-family loss of `batch`, divided by its normaliser, and summed statistics."""
    device = batch.device
    pairs = cast(list[PairExample], batch.examples)
    chosen, rejected, lengths = pair_logps(model, pairs, batch.pad_id, device,
                                           shares_prompt(config))
    chosen_len, rejected_len = lengths.chunk(2)
    ref_c = ref_r = None
    if config.needs_reference:
        if reference.table is not None:
            ref_c = reference.table["chosen"][batch.indices].to(device)
            ref_r = reference.table["rejected"][batch.indices].to(device)
        else:
            with torch.no_grad(), reference.policy_as_reference(model) as ref_model:
                ref_c, ref_r, _ = pair_logps(ref_model, pairs, batch.pad_id, device,
                                             shares_prompt(config))
    per_pair = losses.preference_loss(
        cast(PreferenceLossType, config.loss_type),
        chosen_logps=chosen, rejected_logps=rejected,
        ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
        chosen_lengths=chosen_len, rejected_lengths=rejected_len,
        beta=config.beta, label_smoothing=config.label_smoothing,
        simpo_gamma=config.simpo_gamma, rdpo_alpha=config.rdpo_alpha,
        orpo_lambda=config.orpo_lambda,
    )
    r_c, r_r = losses.implicit_rewards(chosen, rejected, ref_c, ref_r, config.beta)
    stats = {
        "rewards/accuracy": float((r_c > r_r).float().sum()),
        "rewards/margin": float((r_c - r_r).sum()),
        "rewards/chosen": float(r_c.sum()),
        "rewards/rejected": float(r_r.sum()),
        "tokens": float(sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                            for e in pairs)),
    }
    return (per_pair * batch.weights).sum() / batch.normaliser, stats


__all__ = ["micro_batch_loss", "shares_prompt"]
