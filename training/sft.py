"""Supervised fine-tuning (offline): the completion-only loss of one micro-batch.

`prefloop train sft` (training.losses.sft_loss): the token-level NLL of each completion given its
prompt, summed over the optimizer batch and divided by its number of completion tokens (so
gradient accumulation does not change the result); with conditional_sft the prompt carries a
reward tag (training.data).

    prefloop train sft --data sft.jsonl --model smollm2-135m-instruct --out runs/sft1
"""

from __future__ import annotations

from typing import Any, cast

import torch

from training import losses
from training.data import CompletionExample, Example
from training.offline_batch import MicroBatch, sequence_logps


def normaliser(examples: list[Example], indices: list[int]) -> float:
    """SFT's divisor of an optimizer batch: its number of completion tokens."""
    items = cast(list[CompletionExample], [examples[i] for i in indices])
    return float(sum(len(ex.completion_ids) for ex in items))


def micro_batch_loss(model: Any, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT loss of `batch` (already divided by the token normaliser) and summed statistics."""
    items = cast(list[CompletionExample], batch.examples)
    _, out = sequence_logps(model, [ex.prompt_ids for ex in items],
                            [ex.completion_ids for ex in items], batch.pad_id, batch.device)
    token_weights = out.mask * batch.weights.unsqueeze(1)
    loss = losses.sft_loss(out.per_token, token_weights, num_tokens=batch.normaliser)
    stats = {
        "tokens": float(sum(len(e.prompt_ids) + len(e.completion_ids) for e in items)),
        "nll_sum": float(-(out.per_token.detach() * out.mask).sum()),
        "completion_tokens": float(out.mask.sum()),
    }
    return loss, stats


__all__ = ["micro_batch_loss", "normaliser"]
