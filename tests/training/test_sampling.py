"""Next-token sampling (training/sampling.py) against closed forms: inverse-CDF picks give the
exact softmax(logits / T) frequencies on a grid of uniforms, top-p keeps exactly the nucleus,
greedy rows take the argmax, and the returned log-probabilities are log_softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch

from training.sampling import invert_cdf, nucleus_mask, sample_tokens


def _grid(count: int) -> torch.Tensor:
    """`count` uniforms at the centres of equal cells of [0, 1)."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


def test_inverse_cdf_on_a_grid_reproduces_the_distribution_exactly() -> None:
    weights = torch.tensor([0.1, 0.0, 0.25, 0.4, 0.25])
    picks = invert_cdf(weights.expand(1000, -1), _grid(1000))
    counts = torch.bincount(picks, minlength=5).tolist()
    assert counts == [100, 0, 250, 400, 250]


def test_inverse_cdf_never_picks_a_zero_weight_even_at_the_edges() -> None:
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    for u in (0.0, 1e-12, 0.5, 1 - 1e-12, 0.9999999999):
        picks = invert_cdf(weights, torch.tensor([u, u], dtype=torch.float64)).tolist()
        assert picks[0] == 1 and picks[1] in (0, 2)


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p() -> None:
    sorted_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    kept = nucleus_mask(sorted_probs, torch.tensor([0.5, 0.51, 0.8, 1.0])).tolist()
    assert kept == [[True, False, False, False], [True, True, False, False],
                    [True, True, False, False], [True, True, True, True]]
    # The most likely token is always kept, whatever top_p.
    assert nucleus_mask(sorted_probs[:1], torch.tensor([1e-9])).tolist() == [
        [True, False, False, False]]


def test_sampled_frequencies_and_logprobs_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0])
    rows = 4000
    temperature = torch.full((rows,), 0.7)
    tokens, logprobs = sample_tokens(logits.expand(rows, -1), temperature,
                                     torch.ones(rows), _grid(rows))
    expected = torch.softmax(logits / 0.7, dim=-1)
    frequencies = torch.bincount(tokens, minlength=5).double() / rows
    assert frequencies.tolist() == pytest.approx(expected.double().tolist(), abs=1 / rows)
    log_expected = torch.log_softmax(logits / 0.7, dim=-1)
    assert logprobs.tolist() == pytest.approx(log_expected[tokens].tolist(), abs=1e-6)


def test_top_p_samples_only_from_the_nucleus_renormalised() -> None:
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    rows = 1000
    tokens, logprobs = sample_tokens(logits.expand(rows, -1), torch.ones(rows),
                                     torch.full((rows,), 0.75), _grid(rows))
    counts = torch.bincount(tokens, minlength=4).tolist()
    # Nucleus at 0.75: tokens 1 (0.5) and 3 (0.3), renormalised to 0.625 / 0.375.
    assert counts == [0, 625, 0, 375]
    # The log-probability is the untruncated one (what importance ratios compare against).
    assert logprobs[tokens == 1][0].item() == pytest.approx(torch.log(torch.tensor(0.5)).item(),
                                                            abs=1e-6)


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    tokens, logprobs = sample_tokens(logits, torch.tensor([0.0, 1.0, 0.0]),
                                     torch.tensor([1.0, 1.0, 0.5]),
                                     torch.tensor([0.3, 0.999, 0.3], dtype=torch.float64))
    assert tokens[0].item() == 1 and tokens[2].item() == 2
    # Row 1 sampled with u = 0.999: the last token (cumulative mass passes 0.999 only there).
    assert tokens[1].item() == 2
    expected = torch.log_softmax(logits, dim=-1)
    assert logprobs.tolist() == pytest.approx(
        [expected[0, 1].item(), expected[1, 2].item(), expected[2, 2].item()], abs=1e-6)


def test_a_rows_token_does_not_depend_on_the_other_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator)
    temperature = torch.tensor([1.0, 0.5, 0.0, 1.3, 1.0, 0.8])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.7, 1.0, 1.0])
    uniforms = torch.rand(6, generator=generator, dtype=torch.float64)
    together = sample_tokens(logits, temperature, top_p, uniforms)
    for row in range(6):
        alone = sample_tokens(logits[row:row + 1], temperature[row:row + 1],
                              top_p[row:row + 1], uniforms[row:row + 1])
        assert alone[0].item() == together[0][row].item()
        assert alone[1].item() == pytest.approx(together[1][row].item(), abs=1e-6)
