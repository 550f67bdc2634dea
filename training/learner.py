"""The learner of the online algorithms: the policy being trained, its optimizer and reference.

GRPO, rejection sampling and online DPO (training.grpo, training.rejection_sampling,
training.online_dpo) update the policy through a `Learner`: LoRA on CPU by default
(training.policy), bf16 autocast where the hardware has it (training.runtime), log-probs of K
completions per prompt with the prompt run once (`grouped_completion_logps`), and the reference
(the LoRA base with the adapter switched off, or a frozen copy).

    python -c "from training.learner import Learner; help(Learner)"
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.online_config import OnlineConfig

if TYPE_CHECKING:
    import torch


def grouped_completion_logps(
    model: Any,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of K completions per prompt, each prompt run through the model once.

    Collates the id lists for training.logprobs.shared_prompt_pair_logps (prompt prefilled once,
    its KV cache repeated K times, gradients flowing through it), with the logits divided by the
    sampling temperature, so that the learner's log-probs match the distribution the rollouts were
    drawn from.

    Args:
        model: a causal LM.
        prompts: B prompt id lists.
        completions: B*K completion id lists, prompt-major (row b*K + j: sample j of prompt b).
        temperature: the sampling temperature (1 for greedy-sampled data).

    Returns:
        (per_token (B*K, C) log-probs, 0 off the mask; mask (B*K, C) float).
    """
    from training.data import collate_shared_prompts
    from training.logprobs import shared_prompt_pair_logps

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in
             collate_shared_prompts(list(prompts), list(completions), pad_id=0).items()}
    out = shared_prompt_pair_logps(model, batch["prompt_ids"], batch["prompt_mask"],
                                   batch["completion_ids"], batch["completion_mask"],
                                   temperature=temperature)
    return out.per_token, out.mask


# ----------------------------------------------------------------------------- the learner


class Learner:
    """The policy being trained (LoRA on CPU by default), its optimizer and its reference."""

    def __init__(self, config: OnlineConfig, needs_reference: bool,
                 prompts: Sequence[Any] = ()):
        """prompts: the run's prompts; their longest encoding plus max_new_tokens decides the
        attention kernel under `attention = "auto"`."""
        import torch

        from training.models import load_tokenizer
        from training.policy import (
            freeze,
            load_causal_lm,
            trainable_parameters,
            uses_lora,
            with_lora,
        )
        from training.rollout import encode_prompt
        from training.runtime import attention_implementation, select_device, uses_bf16

        self.config = config
        self.device = select_device(config.device)
        self.bf16 = uses_bf16(config.precision, self.device)
        self.tokenizer = load_tokenizer(config.model)
        torch.manual_seed(config.seed)
        longest = max((len(encode_prompt(self.tokenizer, p)) for p in prompts), default=0)
        self.attention = attention_implementation(config.attention, self.device,
                                                  longest + config.max_new_tokens)
        model: Any = load_causal_lm(config.model, self.attention)
        self.lora = uses_lora(config.lora, self.device)
        self.reference_model: Any = None
        if self.lora:
            model = with_lora(model, config, "CAUSAL_LM")
        elif needs_reference:
            # Full fine-tuning: the initial model is kept as a frozen copy. (With LoRA the
            # reference is the base model with the adapter switched off: no second copy.)
            self.reference_model = freeze(copy.deepcopy(model).eval().to(self.device))
        self.model = model.to(self.device)
        self.model.train()
        self.trainable = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.steps = 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        from training.runtime import autocast

        return autocast(self.device, self.bf16)

    @contextlib.contextmanager
    def initial_policy(self) -> Iterator[Any]:
        """The starting model, frozen: LoRA switched off, or the kept copy."""
        if self.lora:
            was_training = self.model.training
            self.model.eval()
            with self.model.disable_adapter():
                yield self.model
            self.model.train(was_training)
        else:
            yield self.reference_model

    def logps(self, model: Any, prompts: Sequence[list[int]], completions: Sequence[list[int]],
              temperature: float, *, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        context = contextlib.nullcontext() if grad else torch.no_grad()
        with context, self.autocast():
            per_token, mask = grouped_completion_logps(model, prompts, completions, temperature)
        return per_token.float(), mask

    def step(self) -> float:
        """Clip, apply and clear the accumulated gradient; returns the gradient norm."""
        from training.optim import optimizer_step

        norm = optimizer_step(self.trainable, self.optimizer, self.config.max_grad_norm)
        self.steps += 1
        return norm

    def weights_for_sync(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        from training.rollout import policy_weights_for_sync

        return policy_weights_for_sync(self.model, dtype=dtype)

    def save_full_model(self, run_dir: Path) -> Path:
        """Write run_dir/model as a FULL model folder (LoRA merged into a fresh model)."""
        from training.models import merge_adapter, record_adapter_base

        final = run_dir / "model"
        if self.lora:
            adapter = run_dir / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            self.model.save_pretrained(adapter)
            self.tokenizer.save_pretrained(adapter)
            record_adapter_base(adapter)
            return merge_adapter(adapter, final)
        tmp = run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


__all__ = ["Learner", "grouped_completion_logps"]
