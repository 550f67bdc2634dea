"""Next-token choice for a batch of sequences with their own temperature, top-p and random
stream: a pure function on tensors, used by the generation engine (training/generation.py).

Each row draws one uniform number from its own generator and picks its token by inverting the
cumulative distribution (in vocabulary order, or in descending-probability order under top-p),
so a row's token depends on its logits, its settings and its generator only, never on which
other rows share the batch.

    python -m pytest -q tests/training/test_sampling.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def invert_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i of each row with P(i) = weights[i] / sum(weights): the first index whose
    cumulative weight exceeds u * total (inverse transform sampling). Zero weights are never
    picked.

    Args:
        weights: (R, V), non-negative, each row with a positive sum.
        uniforms: (R,) in [0, 1).
    """
    import torch

    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1]
    # u * total can round up to the total itself, past every token with a positive weight:
    # keep the target strictly below it.
    below = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniforms.to(cdf.dtype) * total, below).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def nucleus_mask(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, eq. 2): keep the smallest prefix of the
    descending probabilities whose mass reaches top_p; the most likely token is always kept.

    Args:
        sorted_probs: (R, V) each row sorted in descending order.
        top_p: (R,) in (0, 1].
    Returns:
        (R, V) bool, True where a token is kept.
    """
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return mass_before < top_p.unsqueeze(-1)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row, and its log-probability under the sampling distribution
    log_softmax(logits / T) (T = 1 for greedy rows; before top-p truncation, which is what the
    RL losses' importance ratios compare against).

    Args:
        logits: (R, V).
        temperature: (R,); 0 means greedy (argmax).
        top_p: (R,) in (0, 1].
        uniforms: (R,) in [0, 1); ignored for greedy rows.
    Returns:
        tokens (R,) int64 and logprobs (R,) float32.
    """
    import torch

    scores = logits.float()
    greedy = temperature <= 0
    if bool((temperature == 1).all()):
        scaled = scores  # the rollouts' common case: no division over the vocabulary
    else:
        divisor = torch.where(greedy, torch.ones_like(temperature), temperature)
        scaled = scores / divisor.unsqueeze(-1).to(scores.dtype)
    # One exp over the vocabulary serves both the normaliser (the chosen token's
    # log-probability is its scaled logit minus log-sum-exp) and the sampling weights, which
    # invert_cdf takes unnormalised.
    peak = scaled.amax(dim=-1, keepdim=True)
    weights = torch.exp(scaled - peak)
    log_normaliser = peak.squeeze(-1) + torch.log(weights.sum(dim=-1))
    tokens = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    if bool(greedy.any()):
        tokens[greedy] = scores[greedy].argmax(dim=-1)
    if not bool(greedy.all()):
        all_sampled = not bool(greedy.any())
        sampled = (~greedy).nonzero().squeeze(-1)
        probs = weights if all_sampled else weights[sampled]
        nucleus = top_p[sampled] < 1.0
        if not bool(nucleus.any()):
            tokens[sampled] = invert_cdf(probs, uniforms[sampled])
        else:
            plain = sampled[~nucleus]
            if plain.numel():
                tokens[plain] = invert_cdf(probs[~nucleus], uniforms[plain])
            rows = sampled[nucleus]
            nucleus_weights = probs[nucleus]
            normalised = nucleus_weights / nucleus_weights.sum(dim=-1, keepdim=True)
            sorted_probs, order = normalised.sort(dim=-1, descending=True, stable=True)
            kept = sorted_probs * nucleus_mask(sorted_probs, top_p[rows])
            picked = invert_cdf(kept, uniforms[rows])
            tokens[rows] = order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    chosen = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normaliser
    return tokens, chosen


__all__ = ["invert_cdf", "nucleus_mask", "sample_tokens"]
