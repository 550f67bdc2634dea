"""The training losses of prefloop, as pure functions on tensors.

Every function here takes log-probabilities (or rewards) that a model already produced and returns
per-example losses of shape (B,); the trainer decides how to reduce them (a weighted mean over the
whole optimizer batch, so that gradient accumulation does not change the result). Nothing here
touches a model, a tokenizer or a config object, so each loss can be checked against a closed form
or a hand-computed case in milliseconds:

    python -m pytest tests/training/test_losses.py -q

Notation follows TRL: `chosen_logps` is log pi_theta(y_w | x) summed over the completion tokens,
`ref_*` the same under the frozen reference policy, `beta` the KL-regularisation strength.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.loss_names import PreferenceLossType

# --------------------------------------------------------------------------------------------
# Log-probability helpers (shared with the Training II algorithms: PPO/GRPO reuse token_logps).
# --------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token under the logits that predict it.

    Args:
        logits: (..., V) unnormalised scores; position t must already be aligned with target t
            (i.e. the caller has shifted logits by one relative to the input ids).
        target_ids: (...) token ids.

    Returns:
        (...) float32 log pi(target_t | context_<t).
    """
    # log_softmax(x)[y] = x[y] - logsumexp(x); gathering first and subtracting one logsumexp per
    # position avoids materialising a second (..., V) tensor, which dominates memory at V = 49k.
    logits = logits.float()
    picked = torch.gather(logits, -1, target_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` (B, T) over positions where `mask` (B, T) is 1; returns (B,)."""
    return (values * mask).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise reward-model loss, -log sigma(r_w - r_l - m).

    Bradley & Terry (1952); as a reward-model objective: Ouyang et al. 2022 (InstructGPT), Eq. 1.
    The optional margin m comes from Llama 2 (Touvron et al. 2023, Eq. 2): a pair labelled
    "much better" must be separated by at least m. Per-pair weights (1/C(K,2) for pairs derived from
    a K-way ranking, as in InstructGPT) are applied by the trainer's weighted reduction.

    Args:
        chosen_rewards: (B,) scalar rewards of the preferred completions.
        rejected_rewards: (B,) rewards of the dispreferred completions.
        margin: optional (B,) non-negative margins.

    Returns:
        (B,) per-pair losses; ln 2 when the rewards are equal and the margin is zero.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def plackett_luce_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Listwise reward-model loss: negative log-likelihood of a full ranking under Plackett-Luce.

    Plackett (1975), Luce (1959): a ranking is built by choosing the best item among the ones still
    left, with probability softmax(r) over them, so
        -log P(ranking) = -sum_j [ r_j - logsumexp_{k in R_j} r_k ],
    where R_j (the "risk set") holds the items ranked at or below j. Ties follow Breslow's (1974)
    approximation from survival analysis: every member of a tied group is scored against the same
    risk set (the whole group and everything below it). Without ties this is exactly Plackett-Luce;
    with K = 2 and no tie it equals the Bradley-Terry loss; a tie pulls the two rewards together
    (the gradient vanishes when they are equal). This tie rule is prefloop's own choice.

    Args:
        rewards: (B, K) rewards of the K completions of each prompt.
        ranks: (B, K) 1-based ranks, 1 = best; tied completions share a rank.
        valid_mask: optional (B, K) bool, False for padding when lists have different lengths.

    Returns:
        (B,) negative log-likelihood of each ranking (summed over its positions, not averaged).
    """
    if valid_mask is None:
        valid_mask = torch.ones_like(rewards, dtype=torch.bool)
    rewards = rewards.float()
    # risk_set[b, j, k] = completion k is still "in the urn" when completion j is drawn.
    risk_set = (ranks.unsqueeze(1) >= ranks.unsqueeze(2)) & valid_mask.unsqueeze(1)  # (B, K, K)
    expanded = rewards.unsqueeze(1).expand_as(risk_set).masked_fill(~risk_set, float("-inf"))
    log_normaliser = torch.logsumexp(expanded, dim=-1)  # (B, K)
    log_likelihood = (rewards - log_normaliser).masked_fill(~valid_mask, 0.0)
    return -log_likelihood.sum(dim=-1)


# --------------------------------------------------------------------------------------------
# The DPO family (paired preferences, policy vs. frozen reference)
# --------------------------------------------------------------------------------------------


def dpo_sigmoid_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> torch.Tensor:
    """DPO: -log sigma(beta * [(log pi/ref)(y_w) - (log pi/ref)(y_l)]).

    Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7. Equals ln 2 when the policy
    equals the reference (both log-ratios are zero).

    Args:
        chosen_logratios: (B,) log pi_theta(y_w|x) - log pi_ref(y_w|x).
        rejected_logratios: (B,) the same for y_l.
        beta: KL-regularisation strength.
    """
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO: (h - 1/(2 beta))^2, with h the difference of per-token log-ratios.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17 (their tau is our beta). Decision: we divide each summed log-ratio by its
    completion length before taking the difference. The paper writes sequence-level log-ratios;
    summed ones make the squared target scale with length, and the per-token form is the one the
    IPO authors' experiments used (TRL does the same; OpenRLHF does not normalise). At policy =
    reference the loss is (1/(2 beta))^2.

    Args:
        chosen_logratios, rejected_logratios: (B,) summed log-ratios.
        chosen_lengths, rejected_lengths: (B,) number of completion tokens (>= 1).
        beta: regularisation strength tau.
    """
    chosen_per_token = chosen_logratios / chosen_lengths.clamp(min=1)
    rejected_per_token = rejected_logratios / rejected_lengths.clamp(min=1)
    h = chosen_per_token - rejected_per_token
    return (h - 1.0 / (2.0 * beta)) ** 2


def dpo_hinge_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> torch.Tensor:
    """Hinge (SLiC-HF) loss on the DPO margin: max(0, 1 - beta * margin).

    Zhao et al. 2023, "SLiC-HF", Eq. 1 (calibration term), with the log-ratio margin of DPO as in
    Liu et al. 2024 (RSO), Eq. 10; 1/beta plays the role of SLiC's margin delta.
    """
    return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def cdpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Conservative DPO: DPO with labels flipped with probability epsilon (label smoothing).

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO):
    (1 - eps) * -log sigma(beta m) + eps * -log sigma(-beta m). With eps = 0 it is DPO; unlike
    DPO its minimum is at a finite margin m = log((1-eps)/eps) / beta, so the policy cannot drift
    without bound on noisy pairs.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Robust DPO (rDPO): an unbiased estimate of the clean-label DPO loss under flip rate eps.

    Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8:
    [(1 - eps) * l(m) - eps * l(-m)] / (1 - 2 eps), with l(m) = -log sigma(beta m). Needs eps < 1/2.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    clean = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """SimPO: reference-free, length-normalised, with a target reward margin gamma.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6:
    -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma).
    Note the paper's beta is large (2.0-2.5) because the reward is an average per token.
    """
    chosen_rewards = beta * chosen_logps / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * rejected_logps / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)


def rdpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """R-DPO: DPO with a length penalty alpha * (|y_w| - |y_l|) inside the sigmoid.

    Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization",
    Eq. 9: -log sigma(beta m - alpha (|y_w| - |y_l|)). With alpha = 0 it is DPO; alpha > 0 stops
    the policy from gaining reward merely by being longer than the rejected answer.
    """
    margin = beta * (chosen_logratios - rejected_logratios)
    return -F.logsigmoid(margin - alpha * (chosen_lengths - rejected_lengths).float())


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lambda_or: float,
) -> torch.Tensor:
    """ORPO: SFT on y_w plus an odds-ratio penalty, in one reference-free loss.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eqs. 6-7: L = L_SFT + lambda * -log sigma(log odds(y_w) - log odds(y_l)), with
    odds(y) = P(y) / (1 - P(y)) and log P(y) the *average* per-token log-probability (Eq. 4).
    log(1 - P) is computed with log1p(-exp(.)) for stability near P = 1.

    Returns:
        (B,) per-pair losses: the per-token NLL of y_w plus lambda times the odds-ratio term.
    """
    chosen_mean = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_mean = rejected_logps / rejected_lengths.clamp(min=1)
    # Clamp just below 0 so that log1p(-exp(0)) = -inf cannot appear for a fully confident model.
    chosen_mean_c = chosen_mean.clamp(max=-1e-6)
    rejected_mean_c = rejected_mean.clamp(max=-1e-6)
    log_odds = (chosen_mean_c - torch.log1p(-torch.exp(chosen_mean_c))) - (
        rejected_mean_c - torch.log1p(-torch.exp(rejected_mean_c))
    )
    return -chosen_mean - lambda_or * F.logsigmoid(log_odds)


def preference_loss(
    loss_type: PreferenceLossType,
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rdpo_alpha: float = 0.0,
    orpo_lambda: float = 0.1,
) -> torch.Tensor:
    """Dispatch to one DPO-family loss; returns (B,) per-pair losses.

    A plain if/elif on `loss_type` rather than a registry, so grep leads from a config value to
    its equation.
    """
    if loss_type == "simpo":
        return simpo_loss(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta, simpo_gamma
        )
    if loss_type == "orpo":
        return orpo_loss(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, orpo_lambda
        )
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probabilities")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "ipo":
        return ipo_loss(
            chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta
        )
    if loss_type == "hinge":
        return dpo_hinge_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "cdpo":
        return cdpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    if loss_type == "robust":
        return robust_dpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing)
    if loss_type == "rdpo":
        return rdpo_loss(
            chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta, rdpo_alpha
        )
    raise ValueError(f"unknown preference loss_type {loss_type!r}")


def implicit_rewards(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * log(pi/ref) (Rafailov et al. 2023, Sec. 5), for metrics.

    For reference-free losses the reward is beta * log pi (no reference to subtract).
    """
    if ref_chosen_logps is None or ref_rejected_logps is None:
        return beta * chosen_logps.detach(), beta * rejected_logps.detach()
    return (
        beta * (chosen_logps - ref_chosen_logps).detach(),
        beta * (rejected_logps - ref_rejected_logps).detach(),
    )


# --------------------------------------------------------------------------------------------
# KTO (unpaired desirable / undesirable examples)
# --------------------------------------------------------------------------------------------


def kto_reference_point(
    mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z0: a batch estimate of KL(pi_theta || pi_ref), clipped at 0.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Sec. 4.1:
    z0 is estimated from *mismatched* pairs (x_i, y_j), i != j, of the same batch, so that it does
    not reward the policy for the specific completions being scored. It is detached: no gradient
    flows through the reference point.

    Args:
        mismatched_logps: (B,) policy log-probs of the mismatched completions.
        ref_mismatched_logps: (B,) reference log-probs of the same.

    Returns:
        A 0-dim tensor, max(0, mean(mismatched_logps - ref_mismatched_logps)).
    """
    return (mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO: a prospect-theoretic value of each completion's implicit reward against z0.

    Ethayarajh et al. 2024, Eq. 8: with r = log pi/ref,
        desirable:   lambda_D * (1 - sigma(beta (r - z0)))
        undesirable: lambda_U * (1 - sigma(beta (z0 - r)))
    (The paper's lambda_y constant term is dropped; it does not change gradients.) At policy =
    reference with z0 = 0 each desirable example costs 0.5 * lambda_D.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy.
        ref_logps: (B,) the same under the reference.
        is_desirable: (B,) bool labels.
        reference_point: z0, a float or 0-dim tensor (see kto_reference_point).
        beta: risk-aversion / KL strength.
        desirable_weight, undesirable_weight: lambda_D, lambda_U (balance class counts with these;
            the paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    Returns:
        (B,) per-example weighted losses.
    """
    logratios = policy_logps - ref_logps
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (reference_point - logratios)))
    return torch.where(is_desirable.bool(), desirable, undesirable)


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning
# --------------------------------------------------------------------------------------------


def sft_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Completion-only negative log-likelihood (prompt tokens carry no loss).

    Standard maximum likelihood on the completion (Ouyang et al. 2022, Sec. 3.5). Reduced as a
    token mean; `num_tokens` lets the trainer divide by the completion-token count of the whole
    optimizer batch, so that gradient accumulation gives the same gradient as one large batch.
    Conditional SFT (reward-conditioned prefixes, e.g. Hu et al. 2023, arXiv:2308.12050) uses
    this same loss; only the data differ (see training.data.conditioned_prompt).

    Args:
        per_token_logps: (B, T) log-probs of each target token.
        completion_mask: (B, T) 1 on completion tokens, 0 on prompt and padding.
        num_tokens: divisor; defaults to completion_mask.sum().

    Returns:
        A 0-dim tensor.
    """
    total = -(per_token_logps * completion_mask).sum()
    if num_tokens is None:
        num_tokens = completion_mask.sum().clamp(min=1)
    return total / num_tokens

