"""Run TRL 1.x's own loss code on log-probabilities we choose (test-only reference).

TRL inlines its losses in `DPOTrainer._compute_loss`, `KTOTrainer._compute_loss` and
`RewardTrainer.compute_loss`. To compare prefloop's pure functions with them on *the same*
log-probabilities, we call those methods unbound, with a minimal stand-in for the trainer (`self`)
and a stand-in model whose forward returns the per-token log-probs we want. No model, tokenizer or
dataset is involved, so these comparisons run in milliseconds.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model: Any) -> Any:
        return model


def _trainer_stub(**fields: Any) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **fields,
    )


def _outputs(per_token_logps: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
    )


def trl_dpo_loss(
    loss_type: str,
    chosen_token_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """TRL's DPO loss (mean over the batch).

    Args:
        chosen_token_logps, rejected_token_logps: (B, T-1) per-token log-probs (zero off-mask).
        completion_mask: (2B, T) completion mask of the unshifted [chosen; rejected] sequences.
    """
    from trl import DPOTrainer

    per_token = torch.cat([chosen_token_logps, rejected_token_logps])
    stub = _trainer_stub(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    return DPOTrainer._compute_loss(stub, lambda **_: _outputs(per_token), inputs, False)


def trl_kto_loss(
    token_logps: torch.Tensor,
    kl_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """TRL's KTO loss, with its batch KL estimate from the mismatched ("KL") completions."""
    from trl import KTOTrainer

    input_ids = torch.zeros_like(completion_mask)
    kl_input_ids = torch.zeros_like(completion_mask)

    def model(**kwargs: Any) -> SimpleNamespace:
        is_kl = kwargs["input_ids"] is kl_input_ids
        return _outputs(kl_token_logps if is_kl else token_logps)

    stub = _trainer_stub(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    stub._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(stub, m, batch)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": kl_input_ids,
        "KL_attention_mask": torch.ones_like(completion_mask),
        "KL_completion_mask": completion_mask,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    return KTOTrainer._compute_loss(stub, model, inputs, False)


def trl_reward_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None
) -> torch.Tensor:
    """TRL's Bradley-Terry reward-model loss (mean over the batch)."""
    from trl import RewardTrainer

    logits = torch.cat([chosen_rewards, rejected_rewards]).unsqueeze(-1)
    stub = _trainer_stub(args=SimpleNamespace(center_rewards_coefficient=None))
    inputs: dict[str, Any] = {"attention_mask": torch.ones(logits.shape[0], 3)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, lambda **_: SimpleNamespace(logits=logits), inputs)


def trl_orpo_odds_ratio_term(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, lambda_or: float
) -> torch.Tensor:
    """TRL's (experimental) ORPO odds-ratio term per pair, as added to the NLL."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    stub = _trainer_stub(beta=lambda_or)
    losses, *_ = ORPOTrainer.odds_ratio_loss(stub, chosen_mean_logps, rejected_mean_logps)
    return -losses


def trl_simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """TRL's (experimental) CPO trainer with loss_type="simpo", per pair."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOTrainer

    stub = _trainer_stub(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
                         loss_type="simpo")
    losses, *_ = CPOTrainer.cpo_loss(stub, chosen_mean_logps, rejected_mean_logps)
    return losses
