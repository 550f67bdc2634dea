"""Comparing sampled sequences across batch compositions.

A sequence's token is drawn by inverting the CDF of its own distribution with its own uniform
number (training/sampling.py), so the batch around it does not change the draw, except through
the logits' last bits: BLAS kernels block a matmul by its row count, so a row's logits in a
batch of 8 may differ from the same row's alone by ~1e-7. When a draw's target lands within
that of a CDF boundary, it picks the neighbouring token id (the CDF runs in vocabulary order),
and the sequences go apart from there. On a random tiny model, whose distributions are nearly
uniform over 49k tokens, that happens in a few draws per thousand.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest


def assert_same_draws(got_ids: Sequence[int], got_logprobs: Sequence[float],
                      want_ids: Sequence[int], want_logprobs: Sequence[float]) -> None:
    """Equal tokens and log-probs, or equal up to a boundary flip: the first differing draw
    took a neighbouring token id, after identical tokens with equal log-probs."""
    differ = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids, strict=False))
                   if a != b), None)
    if differ is None:
        assert list(got_ids) == list(want_ids)
        assert list(got_logprobs) == pytest.approx(list(want_logprobs), abs=1e-4)
        return
    assert abs(got_ids[differ] - want_ids[differ]) == 1, (differ, got_ids, want_ids)
    assert list(got_logprobs[:differ]) == pytest.approx(list(want_logprobs[:differ]), abs=1e-4)
