"""The math of online RL for language models, as pure functions on tensors.

PPO (Schulman et al. 2017) with the RLHF details of Ziegler et al. 2019 / Ouyang et al. 2022
(token-level KL penalty, reward on the last token, adaptive KL coefficient), GAE (Schulman et al.
2016), advantage whitening with cross-worker statistics (the OpenRLHF "PPO implementation tricks"),
GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath, Sec. 4.1), and the small PPO
compositions built from them (per-shard advantages, the PPO-ptx term, reward normalisation).
Nothing here touches a model or a config: every function is checked against a closed form or a
plain Python loop in

    python -m pytest tests/rl/test_rl_losses.py tests/rl/test_ppo_math.py -q

Shapes: B sequences, T completion positions; `mask` is 1 on completion tokens (the positions that
carry a log-prob, a value and a reward), 0 on padding. Completions are right-padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
LossReduction = Literal["token", "sequence"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: LossReduction) -> torch.Tensor:
    """token: mean over every completion token of the batch (DAPO, Yu et al. 2025, Eq. 8 - long
    answers weigh in proportion to their length); sequence: mean per sequence, then over
    sequences (GRPO as written, Shao et al. 2024, Eq. 3)."""
    if reduction == "token":
        return masked_mean(per_token, mask)
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.mean()


# --------------------------------------------------------------------------------------------
# KL to the reference policy
# --------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html): with
    r = pi_ref(y)/pi(y),
        k1 = -log r                (unbiased, high variance, can be negative)
        k2 = (log r)^2 / 2         (biased, low variance; its gradient is that of the KL)
        k3 = (r - 1) - log r       (unbiased, low variance, always >= 0; GRPO's choice,
                                    Shao et al. 2024, Eq. 4)
    log r is clamped to [-20, 20] before exp in k3 so one wild token cannot overflow.

    Args:
        logp: (B, T) log pi of the sampled tokens.
        ref_logp: (B, T) log pi_ref of the same tokens.
        estimator: k1, k2 or k3.

    Returns:
        (B, T) per-token KL estimates (not masked).
    """
    log_ratio = ref_logp - logp  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def end_of_sequence_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Token-level rewards of RLHF-PPO: a KL penalty on every token, the score on the last one.

    Ziegler et al. 2019, Eq. 2 / Ouyang et al. 2022, Eq. 2: R(x, y) = r(x, y) - beta * KL, spread
    over tokens as r_t = -beta * kl_t, plus the sequence score r(x, y) at the final completion
    token (the reward model scores the end-of-text token only).

    Args:
        scores: (B,) sequence scores.
        kl: (B, T) per-token KL estimates (see kl_penalty).
        mask: (B, T) 1 on completion tokens (right-padded, at least one per row).
        kl_coef: beta.

    Returns:
        (B, T) token rewards, 0 off the mask.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of the final completion token
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """A constant KL coefficient (Ziegler et al. 2019, the non-adaptive setting)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Adapt beta so that the measured KL tracks a target (Ziegler et al. 2019, Sec. 2.2):

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),  K_beta = n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after `n_steps` samples (or steps) that measured `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eqs. 11-16).

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = sum_l (gamma lam)^l delta_{t+l}

    computed backwards in one pass over T. Positions off the mask have V = r = 0, so the value
    after a sequence's last token is 0 (the episode ends there).

    Args:
        rewards: (B, T) token rewards (see end_of_sequence_rewards).
        values: (B, T) critic values V(s_t) of the states before each completion token.
        mask: (B, T) 1 on completion tokens.
        gamma: discount; lam: the GAE lambda.

    Returns:
        (advantages, returns), both (B, T), 0 off the mask; returns = advantages + values.
    """
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def shard_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """(count, sum, sum of squares) of x over the mask, in float64: what each worker sends so
    that whitening uses the statistics of the global batch (OpenRLHF's distributed advantage
    normalisation)."""
    x64, m64 = x.double(), mask.double()
    return float(m64.sum()), float((x64 * m64).sum()), float((x64 * x64 * m64).sum())


def combine_moments(parts: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Global (mean, variance) from the shard moments of every worker.

    The variance is the population variance (divide by the count, as OpenRLHF's masked
    normalisation does), so whitening with it equals whitening the concatenated batch.
    """
    count = sum(p[0] for p in parts)
    if count <= 0:
        raise ValueError("no masked elements in any shard")
    mean = sum(p[1] for p in parts) / count
    variance = max(sum(p[2] for p in parts) / count - mean * mean, 0.0)
    return mean, variance


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    stats: tuple[float, float] | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions; 0 off the mask.

    Args:
        x, mask: (B, T).
        shift_mean: False keeps the mean (only rescales), as for rewards whose sign matters.
        stats: (mean, variance) from combine_moments; None = this tensor's own statistics.
    """
    if stats is None:
        stats = combine_moments([shard_moments(x, mask)])
    mean, variance = stats
    whitened = (x - mean) / math.sqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's outcome advantages: each reward against the others sampled for the same prompt.

    Shao et al. 2024 (DeepSeekMath), Sec. 4.1.2: A_i = (r_i - mean(r)) / std(r) over the group of
    G samples of one prompt (std with Bessel's correction, as TRL's GRPOTrainer). With
    scale_by_std=False it is r_i - mean(r): Dr. GRPO (Liu et al. 2025, Sec. 3.1) drops the std,
    which otherwise up-weights prompts that are almost always (or never) solved.

    Args:
        rewards: (N,) rewards, grouped contiguously: rows [g*G, (g+1)*G) share a prompt.
        group_size: G.
        eps: added to the std so that a group with equal rewards gets advantages 0, not NaN.

    Returns:
        (N,) advantages, zero-mean within every group.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


class RunningMoments:
    """Running mean and std of rewards over batches (Chan et al. 1979 parallel update), used to
    normalise rewards before PPO (OpenRLHF trick "reward normalisation")."""

    def __init__(self, *, shift_mean: bool = True, eps: float = 1e-8):
        self.count = 0.0
        self.mean = 0.0
        self.var = 1.0
        self.shift_mean = shift_mean
        self.eps = eps

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, batch: torch.Tensor) -> torch.Tensor:
        """Fold a batch of rewards into the running statistics and return it normalised by them
        (x - mean) / std, or x / std when shift_mean is False."""
        values = batch.detach().double().flatten()
        n = float(values.numel())
        if n:
            batch_mean = float(values.mean())
            batch_var = float(values.var(unbiased=False))
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
            self.count = total
        std = math.sqrt(self.var + self.eps)
        centred = batch - self.mean if self.shift_mean else batch
        return centred / std


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    *,
    reduction: LossReduction = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token (Schulman et al. 2017, Eq. 7), negated for descent:

        L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A),   rho = exp(logp - old_logp)

    Args:
        logp: (B, T) log-probs under the policy being trained (with gradient).
        old_logp: (B, T) log-probs under the policy that sampled (no gradient).
        advantages: (B, T) per-token advantages (GRPO: the sequence advantage on every token).
        mask: (B, T) 1 on completion tokens.
        clip_eps: epsilon.
        reduction: "token" (mean over all tokens) or "sequence" (mean of per-sequence means).

    Returns:
        (loss, clip_fraction): a 0-dim loss, and the fraction of masked tokens where the clipped
        term is the active one (no gradient flows there).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    return _reduce(per_token, mask, reduction), clip_fraction


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> torch.Tensor:
    """The critic's clipped squared error (Schulman et al. 2017 baselines' PPO2; Ziegler et al.
    2019): 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -eps, eps),
    averaged over the masked tokens."""
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


# ------------------------------------------------------------------------------ PPO compositions


def shard_advantages(*, old_logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                     scores: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                     kl_estimator: KLEstimator, advantage_estimator: Literal["gae", "reinforce"],
                     gamma: float, lam: float) -> dict[str, torch.Tensor]:
    """PPO's token rewards, advantages and returns of one shard, before whitening.

    r_t = -beta * kl_t (+ score on the last token): Ziegler et al. 2019, Eq. 2; then GAE
    (Schulman et al. 2016, Eq. 16) with the critic's values, or with advantage_estimator =
    "reinforce" the discounted return-to-go with no baseline (GAE with V = 0 and lambda = 1).

    Args:
        old_logp, ref_logp, values, mask: (B, C); scores: (B,) normalised sequence scores.

    Returns:
        {"kl", "rewards", "advantages", "returns"}, each (B, C), 0 off the mask.
    """
    kl = kl_penalty(old_logp, ref_logp, kl_estimator) * mask
    rewards = end_of_sequence_rewards(scores, kl, mask, kl_coef)
    if advantage_estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
    else:
        advantages, returns = gae(rewards, torch.zeros_like(values), mask, gamma, 1.0)
        returns = advantages.clone()
    return {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns}


def ptx_combined_loss(policy_loss: torch.Tensor, sft_loss: torch.Tensor, coef: float,
                      scale: str) -> torch.Tensor:
    """PPO-ptx: the policy loss plus an SFT (pretraining-mix) NLL term.

    InstructGPT (Ouyang et al. 2022, Eq. 2) adds gamma * E_pretrain[log pi]. With scale =
    "relative" the SFT term is rescaled to coef * |policy_loss| (the scale factor is detached,
    so it only sets the size of the SFT gradient, not its direction) - the OpenRLHF trick of
    tuning the pretraining loss "relative to the policy loss"; "fixed" is gamma = coef.
    """
    if scale == "fixed":
        return policy_loss + coef * sft_loss
    ratio = policy_loss.detach().abs() / sft_loss.detach().clamp(min=1e-8)
    return policy_loss + coef * ratio * sft_loss


def normalise_scores(scores: torch.Tensor, moments: RunningMoments, *, normalize: bool,
                     clip: float) -> torch.Tensor:
    """Reward normalisation by running statistics (OpenRLHF trick), then clipping to
    [-clip, clip] when clip > 0."""
    out = moments.update(scores) if normalize else scores.clone()
    if clip > 0:
        out = out.clamp(-clip, clip)
    return out.float()


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "LossReduction",
    "RunningMoments",
    "clipped_policy_loss",
    "clipped_value_loss",
    "combine_moments",
    "end_of_sequence_rewards",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "normalise_scores",
    "ptx_combined_loss",
    "shard_advantages",
    "shard_moments",
]
