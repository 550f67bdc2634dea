"""The online-RL math against closed forms and plain Python loops (milliseconds, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from training.rl_losses import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    combine_moments,
    end_of_sequence_rewards,
    gae,
    group_advantages,
    kl_penalty,
    masked_whiten,
    shard_moments,
)


def _ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def test_gae_matches_a_python_loop_per_sequence() -> None:
    torch.manual_seed(0)
    lengths, width, gamma, lam = [5, 3, 1, 6], 6, 0.97, 0.9
    mask = _ragged_mask(lengths, width)
    rewards = torch.randn(4, width) * mask
    values = torch.randn(4, width)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        r, v = rewards[row].tolist(), values[row].tolist()
        expected = [0.0] * n
        running = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            expected[t] = running
        assert advantages[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[row, :n].tolist() == pytest.approx(
            [a + b for a, b in zip(expected, v[:n], strict=True)], abs=1e-5)
        assert advantages[row, n:].abs().sum() == 0
        assert returns[row, n:].abs().sum() == 0


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert advantages[0].tolist() == pytest.approx([1.5, 1.0, 0.5])
    assert returns[0].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_whitening_across_shards_equals_global_whitening() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 7) * 3 + 2
    mask = _ragged_mask([7, 2, 5, 1, 4, 6], 7)
    global_white = masked_whiten(x, mask)
    shards = [(x[:2], mask[:2]), (x[2:3], mask[2:3]), (x[3:], mask[3:])]
    stats = combine_moments([shard_moments(xs, ms) for xs, ms in shards])
    pieces = [masked_whiten(xs, ms, stats=stats) for xs, ms in shards]
    assert torch.allclose(torch.cat(pieces), global_white, atol=1e-6)
    # ... and differs from whitening each shard with its own statistics.
    local = torch.cat([masked_whiten(xs, ms) for xs, ms in shards])
    assert not torch.allclose(local, global_white, atol=1e-3)
    values = x[mask.bool()]
    assert global_white[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert global_white[mask.bool()].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert stats[0] == pytest.approx(values.mean().item(), abs=1e-5)
    assert stats[1] == pytest.approx(values.var(unbiased=False).item(), abs=1e-4)


def test_whitening_without_mean_shift_keeps_the_mean() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask, shift_mean=False)
    # mean 2, population std 1: (x - 2) / 1 + 2 = x; padding zeroed.
    assert out[0].tolist() == pytest.approx([1.0, 3.0, 0.0], abs=1e-6)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_never_clips() -> None:
    torch.manual_seed(2)
    logp = torch.randn(3, 4)
    advantages = torch.randn(3, 4)
    mask = _ragged_mask([4, 2, 3], 4)
    loss, clip_fraction = clipped_policy_loss(logp, logp.clone(), advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-(advantages[mask.bool()].mean().item()), abs=1e-6)
    assert clip_fraction.item() == 0.0


def test_policy_loss_clips_outside_one_plus_minus_eps() -> None:
    eps = 0.2
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clip_fraction = clipped_policy_loss(ratios.log(), old, advantages, mask, eps)
    # token: max(-A rho, -A clip(rho)):
    #   rho 1.5, A +1: max(-1.5, -1.2) = -1.2 (clipped active)
    #   rho 1.5, A -1: max( 1.5,  1.2) =  1.5 (unclipped)
    #   rho 0.5, A +1: max(-0.5, -0.8) = -0.5 (unclipped)
    #   rho 0.5, A -1: max( 0.5,  0.8) =  0.8 (clipped active)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_policy_loss_gradient_vanishes_only_where_clipped() -> None:
    logp = torch.log(torch.tensor([[1.5, 1.5]])).requires_grad_()
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                                  torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad is not None
    assert logp.grad[0, 0].item() == 0.0  # clipped: no push beyond 1 + eps
    assert logp.grad[0, 1].item() == pytest.approx(1.5 / 2)  # d(-A rho)/dlogp = -A rho, mean /2


def test_sequence_reduction_averages_per_sequence_first() -> None:
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = _ragged_mask([3, 1], 3)
    token, _ = clipped_policy_loss(logp, logp, advantages, mask, 0.2)
    sequence, _ = clipped_policy_loss(logp, logp, advantages, mask, 0.2, reduction="sequence")
    assert token.item() == pytest.approx(-(3 + 4) / 4)
    assert sequence.item() == pytest.approx(-(1 + 4) / 2)


def test_clipped_value_loss_by_hand() -> None:
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, -0.5, 0.1]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss = clipped_value_loss(values, old, returns, mask, 0.2)
    # t0: max((0.5-1)^2, (0.2-1)^2) = 0.64; t1: max((-0.5-1)^2, (-0.2-1)^2) = 2.25;
    # t2: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25 + 0.01) / 3)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 4, eps=0.0 + 1e-12)
    std = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]
    assert advantages[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std,
                                                     0.5 / std], rel=1e-5)
    assert advantages[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal, no NaN
    std3 = torch.tensor([0.0, 3.0, 0.0, 1.0]).std().item()
    assert advantages[8:].tolist() == pytest.approx([-1 / std3, 2 / std3, -1 / std3, 0.0],
                                                    rel=1e-5)
    for group in advantages.view(3, 4):
        assert group.sum().item() == pytest.approx(0.0, abs=1e-5)


def test_group_advantages_without_std_are_centred_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 3.0])
    advantages = group_advantages(rewards, 3, scale_by_std=False)
    assert advantages.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -8 / 3, 7 / 3, 1 / 3])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_kl_estimators_match_schulmans_closed_forms() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_r = (ref - logp).tolist()
    k1 = kl_penalty(logp, ref, "k1").tolist()
    k2 = kl_penalty(logp, ref, "k2").tolist()
    k3 = kl_penalty(logp, ref, "k3").tolist()
    assert k1 == pytest.approx([-x for x in log_r])
    assert k2 == pytest.approx([0.5 * x * x for x in log_r])
    assert k3 == pytest.approx([math.exp(x) - 1 - x for x in log_r])
    assert k3[2] == 0.0 and min(k3) >= 0.0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl() -> None:
    # Two categorical distributions; sample from p, estimate KL(p || q).
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True,
                                generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert kl_penalty(logp, logq, estimator).mean().item() == pytest.approx(true_kl, rel=0.03)


def test_end_of_sequence_rewards_puts_the_score_on_the_last_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = _ragged_mask([3, 2], 3)
    rewards = end_of_sequence_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 1.0])
    assert rewards[1].tolist() == pytest.approx([-0.2, -0.25 - 2.0, 0.0])


def test_adaptive_kl_controller_follows_ziegler_et_al() -> None:
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    controller.update(current_kl=9.0, n_steps=256)  # error clip(0.5) = 0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    controller.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 0.0256) * (1 - 0.1 * 0.01))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def test_running_moments_equal_the_statistics_of_everything_seen() -> None:
    torch.manual_seed(3)
    first, second = torch.randn(10) * 2 + 1, torch.randn(7) - 3
    moments = RunningMoments()
    moments.update(first)
    normalised = moments.update(second)
    everything = torch.cat([first, second]).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.var == pytest.approx(everything.var(unbiased=False).item())
    expected = (second.double() - everything.mean()) / everything.std(unbiased=False)
    assert normalised.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    scale_only = RunningMoments(shift_mean=False)
    out = scale_only.update(torch.tensor([2.0, 4.0]))
    assert out.tolist() == pytest.approx([2.0, 4.0], abs=1e-6)  # std 1, mean kept
