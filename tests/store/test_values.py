"""Pure label-value helpers: rankings, ratings, shown <-> canonical order."""

from itertools import permutations

import pytest

from store.errors import InvalidInput
from store.values import (
    content_hash,
    pair_preference,
    pairwise_canonical_to_shown,
    pairwise_shown_to_canonical,
    ranking_to_ranks,
    ranks_canonical_to_shown,
    ranks_shown_to_canonical,
    ratings_to_ranks,
    validate_content,
    validate_ranks,
)


def test_ranking_best_to_worst_becomes_ranks_per_position():
    assert ranking_to_ranks([2, 0, 1], 3) == [2, 3, 1]


def test_ranking_with_tied_group_shares_a_rank():
    assert ranking_to_ranks([[0, 2], 1], 3) == [1, 2, 1]
    assert ranking_to_ranks([1, [0, 2, 3]], 4) == [2, 1, 2, 2]


@pytest.mark.parametrize(
    ("ranking", "message"),
    [([0, 1], "missing"), ([0, 0, 1], "twice"), ([0, 1, 3], "there are 3"), ([], "non-empty"),
     ([0, "1", 2], "integers"), ([0, True, 2], "integers"), ([[], 0, 1, 2], "empty tie group")],
)
def test_ranking_that_is_not_a_permutation_is_refused(ranking, message):
    with pytest.raises(InvalidInput, match=message):
        ranking_to_ranks(ranking, 3)


def test_ratings_higher_is_better_and_equal_ratings_tie():
    assert ratings_to_ranks([5, 5, 1, 2], 4) == [1, 1, 3, 2]
    assert ratings_to_ranks([0.1, 0.9], 2) == [2, 1]
    with pytest.raises(InvalidInput):
        ratings_to_ranks([1, 2], 3)


def test_ranks_must_be_dense():
    assert validate_ranks([1, 1, 2], 3) == [1, 1, 2]
    with pytest.raises(InvalidInput, match="dense"):
        validate_ranks([1, 3, 3], 3)


def test_pairwise_shown_and_canonical_are_inverse_for_both_orders():
    for shown_order in ([0, 1], [1, 0]):
        for choice in ("a", "b", "tie", "both_bad"):
            canonical = pairwise_shown_to_canonical(choice, shown_order)
            assert pairwise_canonical_to_shown(canonical, shown_order) == choice
    # Shown swapped: the annotator's "a" (left) is the canonical second completion.
    assert pairwise_shown_to_canonical("a", [1, 0]) == "b"
    assert pairwise_shown_to_canonical("tie", [1, 0]) == "tie"


def test_ranks_shown_and_canonical_are_inverse_for_every_order():
    ranks = [3, 1, 2, 1]
    for shown_order in permutations(range(4)):
        shown = ranks_canonical_to_shown(ranks, shown_order)
        assert ranks_shown_to_canonical(shown, shown_order) == ranks
    assert ranks_canonical_to_shown([3, 1, 2], [2, 0, 1]) == [2, 3, 1]


def test_pair_preference():
    assert pair_preference([2, 1, 2], 0, 1) == 1
    assert pair_preference([2, 1, 2], 0, 2) is None


def test_content_is_text_or_messages():
    assert validate_content("hi") == "hi"
    messages = [{"role": "user", "content": "hi"}]
    assert validate_content(messages) == messages
    for bad in ("", "   ", [], [{"role": "robot", "content": "x"}], [{"role": "user"}], 3, None):
        with pytest.raises(InvalidInput):
            validate_content(bad)


def test_content_hash_is_key_order_independent():
    assert content_hash([{"role": "user", "content": "x"}]) == content_hash(
        [{"content": "x", "role": "user"}])
    assert content_hash("x") != content_hash([{"role": "user", "content": "x"}])
