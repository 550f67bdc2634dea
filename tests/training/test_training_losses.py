"""Value tests for training/losses.py: closed forms, hand-computed cases, and TRL 1.x equality."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.training.trl_reference import trl_dpo_loss, trl_kto_loss, trl_reward_loss
from training import losses

LN2 = math.log(2.0)


def _random_pairs(batch: int = 5, seq: int = 9, seed: int = 0):
    """Per-token log-probs of [chosen; rejected]: a 3-token prompt, ragged completions."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * batch, seq, dtype=torch.long)
    for i in range(2 * batch):
        length = int(torch.randint(1, seq - 3, (1,), generator=gen))
        mask[i, 3 : 3 + length] = 1
    shifted = mask[:, 1:]
    per_token = -torch.rand(2 * batch, seq - 1, generator=gen) * 3 * shifted
    ref = -torch.rand(2 * batch, generator=gen) * 10
    return per_token, mask, ref


# ---------------------------------------------------------------- log-prob helper


def test_token_logps_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11)
    targets = torch.randint(0, 11, (2, 4))
    expected = F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(losses.token_logps(logits, targets), expected)


# ---------------------------------------------------------------- reward models


def test_bradley_terry_equal_rewards_is_ln2():
    r = torch.tensor([0.3, -2.0, 5.0])
    torch.testing.assert_close(losses.bradley_terry_loss(r, r), torch.full((3,), LN2))


def test_bradley_terry_hand_computed_with_margin():
    loss = losses.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0]))
    # -log sigma(2 - 0.5 - 1) = log(1 + e^-0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-7)


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_equals_trl_reward_trainer(with_margin):
    torch.manual_seed(1)
    chosen, rejected = torch.randn(6), torch.randn(6)
    margin = torch.rand(6) if with_margin else None
    ours = losses.bradley_terry_loss(chosen, rejected, margin).mean()
    torch.testing.assert_close(ours, trl_reward_loss(chosen, rejected, margin))


def test_plackett_luce_hand_computed_three_items():
    rewards = torch.tensor([[1.0, 2.0, 0.0]])
    ranks = torch.tensor([[2, 1, 3]])  # item 1 best, then item 0, then item 2
    lse = math.log(math.e**1 + math.e**2 + 1.0)
    expected = -((2.0 - lse) + (1.0 - math.log(math.e + 1.0)) + 0.0)
    assert losses.plackett_luce_loss(rewards, ranks).item() == pytest.approx(expected, abs=1e-6)


def test_plackett_luce_with_two_items_is_bradley_terry():
    rewards = torch.tensor([[0.7, -0.4], [1.0, 3.0]])
    ranks = torch.tensor([[1, 2], [2, 1]])
    bt = losses.bradley_terry_loss(torch.tensor([0.7, 3.0]), torch.tensor([-0.4, 1.0]))
    torch.testing.assert_close(losses.plackett_luce_loss(rewards, ranks), bt)


def test_plackett_luce_probabilities_of_all_rankings_sum_to_one():
    rewards = torch.tensor([0.3, -1.2, 2.0, 0.1])
    total = 0.0
    for order in itertools.permutations(range(4)):
        ranks = torch.empty(4, dtype=torch.long)
        ranks[list(order)] = torch.arange(1, 5)
        total += math.exp(-losses.plackett_luce_loss(rewards[None], ranks[None]).item())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_plackett_luce_tie_pulls_rewards_together():
    rewards = torch.tensor([[0.5, 0.5]], requires_grad=True)
    loss = losses.plackett_luce_loss(rewards, torch.tensor([[1, 1]]))
    assert loss.item() == pytest.approx(2 * LN2, abs=1e-6)  # Breslow: both scored against {0, 1}
    loss.backward()
    torch.testing.assert_close(rewards.grad, torch.zeros(1, 2))
    unequal = torch.tensor([[2.0, 0.0]], requires_grad=True)
    losses.plackett_luce_loss(unequal, torch.tensor([[1, 1]])).backward()
    assert unequal.grad[0, 0] > 0 > unequal.grad[0, 1]  # descent lowers the larger reward


def test_plackett_luce_ignores_padding_and_constant_shifts():
    rewards = torch.tensor([[1.0, 2.0, 0.0, 9.0]])
    ranks = torch.tensor([[2, 1, 3, 1]])
    valid = torch.tensor([[True, True, True, False]])
    padded = losses.plackett_luce_loss(rewards, ranks, valid)
    unpadded = losses.plackett_luce_loss(rewards[:, :3], ranks[:, :3])
    torch.testing.assert_close(padded, unpadded)
    shifted = losses.plackett_luce_loss(rewards[:, :3] + 5, ranks[:, :3])
    torch.testing.assert_close(shifted, unpadded)


# ---------------------------------------------------------------- DPO family


def test_dpo_sigmoid_policy_equals_reference_is_ln2():
    zeros = torch.zeros(4)
    torch.testing.assert_close(losses.dpo_sigmoid_loss(zeros, zeros, 0.1), torch.full((4,), LN2))


def test_ipo_zero_margin_is_inverse_two_beta_squared():
    zeros, lengths = torch.zeros(3), torch.tensor([1, 5, 9])
    loss = losses.ipo_loss(zeros, zeros, lengths, lengths, beta=0.25)
    torch.testing.assert_close(loss, torch.full((3,), (1 / 0.5) ** 2))


def test_ipo_hand_computed_uses_per_token_log_ratios():
    loss = losses.ipo_loss(
        torch.tensor([4.0]), torch.tensor([-2.0]), torch.tensor([2]), torch.tensor([4]), beta=0.5
    )
    assert loss.item() == pytest.approx((2.0 + 0.5 - 1.0) ** 2)


def test_hinge_hand_computed():
    loss = losses.dpo_hinge_loss(torch.tensor([1.0, 30.0]), torch.tensor([-1.0, 0.0]), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.8, 0.0]))


def test_cdpo_and_robust_reduce_to_dpo_without_label_noise():
    c, r = torch.tensor([1.5, -0.3]), torch.tensor([0.2, 0.4])
    dpo = losses.dpo_sigmoid_loss(c, r, 0.5)
    torch.testing.assert_close(losses.cdpo_loss(c, r, 0.5, 0.0), dpo)
    torch.testing.assert_close(losses.robust_dpo_loss(c, r, 0.5, 0.0), dpo)


def test_cdpo_hand_computed_and_minimum_at_finite_margin():
    eps, beta = 0.1, 1.0
    loss = losses.cdpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), beta, eps)
    expected = 0.9 * math.log1p(math.exp(-2.0)) + 0.1 * math.log1p(math.exp(2.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    best = math.log(0.9 / 0.1)  # d/dm = 0 at m = log((1-eps)/eps)
    margin = torch.tensor([best], requires_grad=True)
    losses.cdpo_loss(margin, torch.zeros(1), beta, eps).backward()
    assert abs(margin.grad.item()) < 1e-6


def test_simpo_hand_computed():
    loss = losses.simpo_loss(
        torch.tensor([-4.0]), torch.tensor([-12.0]), torch.tensor([2]), torch.tensor([4]),
        beta=2.0, gamma=0.5,
    )
    # beta * (-2) - beta * (-3) - gamma = 1.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)


def test_rdpo_zero_alpha_is_dpo_and_penalises_longer_chosen():
    c, r = torch.tensor([1.0]), torch.tensor([0.0])
    lc, lr = torch.tensor([10]), torch.tensor([4])
    torch.testing.assert_close(
        losses.rdpo_loss(c, r, lc, lr, 0.5, 0.0), losses.dpo_sigmoid_loss(c, r, 0.5)
    )
    loss = losses.rdpo_loss(c, r, lc, lr, beta=0.5, alpha=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(0.5 - 0.6))), abs=1e-6)


def test_orpo_hand_computed_from_probabilities():
    chosen_logps, rejected_logps = torch.tensor([-1.0]), torch.tensor([-6.0])
    lengths = torch.tensor([2])
    p_w, p_l = math.exp(-0.5), math.exp(-3.0)
    log_odds = math.log(p_w / (1 - p_w)) - math.log(p_l / (1 - p_l))
    expected = 0.5 + 0.2 * math.log1p(math.exp(-log_odds))
    loss = losses.orpo_loss(chosen_logps, rejected_logps, lengths, lengths, lambda_or=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("ours", "theirs", "smoothing"),
    [("sigmoid", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("hinge", "hinge", 0.0),
     ("robust", "robust", 0.2)],
)
def test_dpo_family_equals_trl_on_same_logps(ours, theirs, smoothing):
    per_token, mask, ref = _random_pairs()
    shifted = mask[:, 1:]
    logps = losses.masked_sum(per_token, shifted)
    lengths = shifted.sum(-1)
    b = logps.shape[0] // 2
    value = losses.preference_loss(
        ours,
        chosen_logps=logps[:b], rejected_logps=logps[b:],
        ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:],
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        beta=0.3, label_smoothing=smoothing,
    ).mean()
    expected = trl_dpo_loss(
        theirs, per_token[:b], per_token[b:], mask, ref[:b], ref[b:], beta=0.3,
        label_smoothing=smoothing,
    )
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


def test_reference_based_loss_without_reference_is_an_error():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="reference"):
        losses.preference_loss(
            "sigmoid", chosen_logps=x, rejected_logps=x, ref_chosen_logps=None,
            ref_rejected_logps=None, chosen_lengths=x, rejected_lengths=x, beta=0.1,
        )


# ---------------------------------------------------------------- KTO


def test_kto_policy_equals_reference_zero_reference_point_is_half():
    logps = torch.tensor([-3.0, -5.0, -1.0])
    labels = torch.tensor([True, True, False])
    loss = losses.kto_loss(logps, logps, labels, 0.0, beta=0.1, undesirable_weight=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.5, 1.0]))


def test_kto_reference_point_is_clipped_mean_log_ratio():
    z0 = losses.kto_reference_point(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert z0.item() == pytest.approx(0.5)
    assert losses.kto_reference_point(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def test_kto_equals_trl_on_same_logps():
    gen = torch.Generator().manual_seed(3)
    batch, seq = 6, 8
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[:, 2:] = 1
    token = -torch.rand(batch, seq - 1, generator=gen) * mask[:, 1:]
    kl_token = -torch.rand(batch, seq - 1, generator=gen) * mask[:, 1:]
    labels = torch.tensor([True, False, True, True, False, False])
    ref = losses.masked_sum(token, mask[:, 1:]) + torch.randn(batch, generator=gen)
    ref_kl = losses.masked_sum(kl_token, mask[:, 1:]) - torch.rand(batch, generator=gen)
    z0 = losses.kto_reference_point(losses.masked_sum(kl_token, mask[:, 1:]), ref_kl)
    assert z0.item() > 0  # exercise a non-trivial reference point
    ours = losses.kto_loss(
        losses.masked_sum(token, mask[:, 1:]), ref, labels, z0, 0.2, 1.0, 1.33
    ).mean()
    theirs = trl_kto_loss(token, kl_token, mask, labels, ref, ref_kl, 0.2, 1.0, 1.33)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- SFT


def test_sft_loss_is_completion_token_mean_nll():
    per_token = torch.tensor([[-9.0, -1.0, -2.0], [-9.0, -9.0, -3.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert losses.sft_loss(per_token, mask).item() == pytest.approx(2.0)
    assert losses.sft_loss(per_token, mask, num_tokens=6).item() == pytest.approx(1.0)


def test_simpo_equals_trl_cpo_simpo():
    from tests.training.trl_reference import trl_simpo_loss

    torch.manual_seed(4)
    chosen, rejected = -torch.rand(6) * 30, -torch.rand(6) * 30
    lc, lr = torch.randint(1, 20, (6,)), torch.randint(1, 20, (6,))
    ours = losses.simpo_loss(chosen, rejected, lc, lr, beta=2.0, gamma=0.7)
    theirs = trl_simpo_loss(chosen / lc, rejected / lr, beta=2.0, gamma=0.7)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_orpo_odds_ratio_term_equals_trl_orpo():
    from tests.training.trl_reference import trl_orpo_odds_ratio_term

    torch.manual_seed(5)
    chosen, rejected = -torch.rand(6) * 30 - 0.1, -torch.rand(6) * 30 - 0.1
    lc, lr = torch.randint(1, 20, (6,)), torch.randint(1, 20, (6,))
    ours = losses.orpo_loss(chosen, rejected, lc, lr, lambda_or=0.25) - (-(chosen / lc))
    theirs = trl_orpo_odds_ratio_term(chosen / lc, rejected / lr, lambda_or=0.25)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
