"""Pure functions on label values and content: validation, canonical forms, hashing.

A label is stored in *canonical* positions (the task's own order of completions). People and
judges see the completions in a *shown* order; `shown_order[i]` is the canonical position shown
i-th. These helpers convert between the two and turn listwise answers (a ranking best-to-worst,
possibly with tied groups, or ratings) into `ranks`: the 1-based rank of each canonical position,
tied positions sharing a rank (dense ranking, so ranks are 1..m with no gaps).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from store.errors import InvalidInput
from store.models import BINARY_CHOICES, PAIRWISE_CHOICES, TaskKind

MAX_CONTENT_CHARS = 200_000
ROLES = ("system", "user", "assistant", "tool")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def content_hash(content: str | list[dict[str, str]]) -> str:
    return sha256_hex(canonical_json(content))


def validate_content(content: Any, *, what: str = "content") -> str | list[dict[str, str]]:
    """Text, or a non-empty list of {"role", "content"} messages (TRL's conversational form)."""
    if isinstance(content, str):
        if not content.strip():
            raise InvalidInput(f"{what} is empty")
        if len(content) > MAX_CONTENT_CHARS:
            raise InvalidInput(f"{what} is longer than {MAX_CONTENT_CHARS} characters")
        return content
    if isinstance(content, list) and content:
        total = 0
        for i, message in enumerate(content):
            if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
                raise InvalidInput(f"{what}[{i}] must be an object with 'role' and 'content'")
            role, text = message.get("role"), message.get("content")
            if role not in ROLES:
                raise InvalidInput(f"{what}[{i}].role must be one of {', '.join(ROLES)}")
            if not isinstance(text, str):
                raise InvalidInput(f"{what}[{i}].content must be a string")
            total += len(text)
        if total > MAX_CONTENT_CHARS:
            raise InvalidInput(f"{what} is longer than {MAX_CONTENT_CHARS} characters")
        return [dict(m) for m in content]
    raise InvalidInput(f"{what} must be a non-empty string or a list of chat messages")


def content_text(content: str | list[dict[str, str]]) -> str:
    """The text of a completion (the last message's content for a conversational one)."""
    return content if isinstance(content, str) else content[-1]["content"]


def validate_choice(kind: TaskKind, choice: Any) -> str:
    allowed = PAIRWISE_CHOICES if kind == TaskKind.pairwise else BINARY_CHOICES
    if choice not in allowed:
        raise InvalidInput(f"a {kind.value} label must be one of {', '.join(allowed)}")
    return str(choice)


def ranking_to_ranks(ranking: Any, k: int) -> list[int]:
    """[best, ..., worst] with tied groups as lists -> 1-based dense ranks per position.

    >>> ranking_to_ranks([[0, 2], 1], 3)
    [1, 2, 1]
    """
    if not isinstance(ranking, list) or not ranking:
        raise InvalidInput("ranking must be a non-empty list of completion indices")
    ranks: list[int | None] = [None] * k
    for rank, group in enumerate(ranking, start=1):
        members = group if isinstance(group, list) else [group]
        if not members:
            raise InvalidInput("ranking has an empty tie group")
        for index in members:
            if not isinstance(index, int) or isinstance(index, bool):
                raise InvalidInput("ranking entries must be integers (or lists of tied integers)")
            if not 0 <= index < k:
                raise InvalidInput(f"ranking names completion {index}, but there are {k}")
            if ranks[index] is not None:
                raise InvalidInput(f"ranking names completion {index} twice")
            ranks[index] = rank
    missing = [i for i, r in enumerate(ranks) if r is None]
    if missing:
        raise InvalidInput(f"ranking is not a permutation: completions {missing} are missing")
    return [int(r) for r in ranks if r is not None]


def ratings_to_ranks(ratings: Any, k: int) -> list[int]:
    """Higher-is-better ratings -> dense ranks (equal ratings tie)."""
    if not isinstance(ratings, list) or len(ratings) != k:
        raise InvalidInput(f"ratings must be a list of {k} numbers")
    if any(isinstance(r, bool) or not isinstance(r, int | float) for r in ratings):
        raise InvalidInput("ratings must be numbers")
    distinct = sorted(set(ratings), reverse=True)
    return [distinct.index(r) + 1 for r in ratings]


def validate_ranks(ranks: Any, k: int) -> list[int]:
    """Ranks must be dense: each of 1..max appears, and there are exactly k of them."""
    if (
        not isinstance(ranks, list)
        or len(ranks) != k
        or any(not isinstance(r, int) or isinstance(r, bool) for r in ranks)
    ):
        raise InvalidInput(f"ranks must be a list of {k} integers")
    if k and sorted(set(ranks)) != list(range(1, max(ranks) + 1)):
        raise InvalidInput("ranks must be dense 1-based ranks (1, 2, ... with ties sharing one)")
    return list(ranks)


def validate_shown_order(shown_order: Any, k: int) -> list[int]:
    if (
        not isinstance(shown_order, list)
        or sorted(shown_order) != list(range(k))
        or any(isinstance(i, bool) for i in shown_order)
    ):
        raise InvalidInput(f"shown_order must be a permutation of 0..{k - 1}")
    return list(shown_order)


def pairwise_shown_to_canonical(choice: str, shown_order: Sequence[int]) -> str:
    """'a' means the completion shown first; map it to the canonical position's letter."""
    if choice in ("a", "b"):
        canonical_position = shown_order[0 if choice == "a" else 1]
        return "a" if canonical_position == 0 else "b"
    return choice


def pairwise_canonical_to_shown(choice: str, shown_order: Sequence[int]) -> str:
    if choice in ("a", "b"):
        canonical_position = 0 if choice == "a" else 1
        return "a" if shown_order[0] == canonical_position else "b"
    return choice


def ranks_shown_to_canonical(shown_ranks: Sequence[int], shown_order: Sequence[int]) -> list[int]:
    """shown_ranks[i] is the rank of the i-th shown completion."""
    ranks = [0] * len(shown_order)
    for shown_index, canonical_position in enumerate(shown_order):
        ranks[canonical_position] = shown_ranks[shown_index]
    return ranks


def ranks_canonical_to_shown(ranks: Sequence[int], shown_order: Sequence[int]) -> list[int]:
    return [ranks[canonical_position] for canonical_position in shown_order]


def pair_preference(ranks: Sequence[int], i: int, j: int) -> int | None:
    """The preferred of positions i and j under `ranks`, or None when they are tied."""
    if ranks[i] == ranks[j]:
        return None
    return i if ranks[i] < ranks[j] else j
