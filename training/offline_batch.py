"""One micro-batch of the offline loop, and its log-probs under the policy and the reference.

Each offline algorithm (training.sft, training.reward_model, training.dpo, training.kto) gets a
`MicroBatch` (its examples, their weights, the optimizer batch's shared normaliser) and, where
the loss compares with a frozen reference, a `Reference`: a table of log-probs computed once per
dataset (`reference_logps`), or a model run per step (the LoRA base with the adapter switched
off, or a separate frozen model).

    python -c "from training.offline_batch import MicroBatch; help(MicroBatch)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from training.data import (
    CompletionExample,
    Example,
    PairExample,
    collate_pairs,
    collate_sequences,
    collate_shared_prompt_pairs,
)
from training.data_parallel import Ranks
from training.logprobs import completion_logps, shared_prompt_pair_logps
from training.runtime import autocast


@dataclass(frozen=True)
class MicroBatch:
    """What every offline loss gets for one micro-batch (this rank's shard of it)."""

    examples: list[Example]
    indices: list[int]
    """The examples' positions in the dataset (rows of the reference table)."""
    normaliser: float
    """The divisor shared by the optimizer batch's micro-batches (trainer.batch_normaliser)."""
    pad_id: int
    device: torch.device

    @property
    def weights(self) -> torch.Tensor:
        """(B,) example weights."""
        return torch.tensor([ex.weight for ex in self.examples], device=self.device)


# ----------------------------------------------------------------------------- log-probs


def pair_logps(model: Any, batch: list[PairExample], pad_id: int,
               device: torch.device, share_prompt: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected summed log-probs ((B,), (B,)) plus lengths (2B, chosen first).

    share_prompt: prompt once through the KV cache, then both completions (see
    training.logprobs.shared_prompt_pair_logps); otherwise [chosen; rejected] full sequences in
    one forward pass.
    """
    if share_prompt and all(ex.prompt_ids for ex in batch):  # an empty prompt has no last token
        shared = {k: v.to(device) for k, v in collate_shared_prompt_pairs(batch, pad_id).items()}
        out = shared_prompt_pair_logps(model, shared["prompt_ids"], shared["prompt_mask"],
                                       shared["completion_ids"], shared["completion_mask"])
        return out.logps[0::2], out.logps[1::2], torch.cat([out.lengths[0::2],
                                                            out.lengths[1::2]])
    tensors = {k: v.to(device) for k, v in collate_pairs(batch, pad_id).items()}
    out = completion_logps(model, tensors["input_ids"], tensors["attention_mask"],
                           tensors["completion_mask"])
    chosen, rejected = out.logps.chunk(2)
    return chosen, rejected, out.lengths


def sequence_logps(model: Any, prompts: list[list[int]],
                   completions: list[list[int]], pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, Any]:
    """Summed completion log-probs (B,) of prompt + completion rows, and the full output
    (per-token log-probs and mask, see training.logprobs.completion_logps)."""
    tensors = {k: v.to(device) for k, v in collate_sequences(prompts, completions, pad_id).items()}
    out = completion_logps(model, tensors["input_ids"], tensors["attention_mask"],
                           tensors["completion_mask"])
    return out.logps, out


# ----------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """Where reference log-probs come from: a precomputed table, or a model run per step."""

    table: dict[str, torch.Tensor] | None = None
    model: Any = None
    use_disabled_adapter: bool = False

    @contextlib.contextmanager
    def policy_as_reference(self, policy: Any) -> Iterator[Any]:
        if self.use_disabled_adapter:
            with policy.disable_adapter():
                yield policy
        else:
            assert self.model is not None
            yield self.model


@torch.no_grad()
def reference_logps(
    mode: str, model: Any, examples: list[Example], batches: list[list[int]],
    pad_id: int, device: torch.device, bf16: bool, progress: bool = True,
    share_prompt: bool = False, owned: list[list[int]] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, torch.Tensor]:
    """Reference log-probs of the examples, computed once before training.

    Args:
        batches: micro-batches of example indices (see reference_plan).
        owned: for each batch, the indices whose values it sets (default: all of them, later
            batches overwriting earlier ones).
        ranks: in a multi-process run each rank scores its own batches; the tables are then summed
            over ranks (each example has one owner, the others contribute an exact 0).

    Returns:
        dpo: {"chosen", "rejected"}; kto: {"completion", "kl"} (the example's own and its
        mismatched completion); each (N,) float32, NaN for examples in no batch. The model is put
        in eval mode for the pass and restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    keys = ("chosen", "rejected") if mode == "dpo" else ("completion", "kl")
    table = {key: torch.full((len(examples),), float("nan")) for key in keys}
    # One autocast region for the whole pass: the weights do not change, so autocast's cache
    # casts each of them to bf16 once instead of once per micro-batch.
    with tqdm(total=len(batches), desc="reference log-probs", disable=not progress,
              leave=False) as bar, autocast(device, bf16):
        for number, indices in enumerate(batches):
            chunk = [examples[i] for i in indices]
            if mode == "dpo":
                chosen, rejected, _ = pair_logps(model, cast(list[PairExample], chunk),
                                                 pad_id, device, share_prompt)
                values = (chosen, rejected)
            else:
                items = cast(list[CompletionExample], chunk)
                prompts = [ex.prompt_ids for ex in items]
                own, _ = sequence_logps(model, prompts, [ex.completion_ids for ex in items],
                                        pad_id, device)
                kl, _ = sequence_logps(model, prompts, [ex.kl_completion_ids for ex in items],
                                       pad_id, device)
                values = (own, kl)
            keep = indices if owned is None else owned[number]
            rows = [indices.index(i) for i in keep]
            for key, value in zip(keys, values, strict=True):
                table[key][keep] = value.float().cpu()[rows]
            bar.update(1)
    model.train(was_training)
    if ranks is not None and ranks.distributed:
        import torch.distributed as dist

        for key in keys:
            scored = ~torch.isnan(table[key])
            merged = torch.stack([torch.where(scored, table[key], 0.0).double(),
                                  scored.double()])
            dist.all_reduce(merged)
            table[key] = torch.where(merged[1] > 0, merged[0], float("nan")).float()
    return table


__all__ = ["MicroBatch", "Reference", "pair_logps", "reference_logps", "sequence_logps"]
