"""The log-probability verdict of an LLM judge (`verdict = "logprobs"`): read the judge's
next-token distribution over the answer labels instead of parsing a generated answer.

RLAIF (Lee et al. 2023, arXiv 2309.00267, section 2.1) asks the labeler for "1" or "2" and
takes the softmax of the two tokens' log-probabilities as the preference distribution; against
position bias it judges both orders and averages the two distributions (section 2.1.1). Here the
labels are "A"/"B" (pairwise) and "good"/"bad" (binary). The endpoint returns the `top_logprobs`
likeliest tokens at each generated position; the first position whose list holds a label is
read, so a leading space, quote, `**` or code fence before the letter does not lose the verdict.
A label missing from that list is at most as likely as the least likely token listed, and is
given that bound (it keeps the verdict's confidence honest rather than 1.0).

Every function is pure (tested in tests/feedback/test_label_logprobs.py on hand-computed
values); feedback/plans.py calls them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feedback.judge import Decision, pairwise_to_canonical

LABELS: dict[str, tuple[str, str]] = {"pairwise": ("A", "B"), "binary": ("GOOD", "BAD")}
LOGPROB_KINDS = tuple(LABELS)
# Characters around a label token that do not change which label it is.
_DECORATION = " \t\n\r\"'`*_[](){}<>.:,;!"
# Generated tokens asked for: the label, plus room for a few decoration tokens before it.
LABEL_MAX_TOKENS = 4


def label_instructions(kind: str) -> str:
    """The answer format of a log-prob call: one label, nothing else."""
    if kind == "pairwise":
        return ("Answer with a single letter and nothing else: A if Response A is better, "
                "B if Response B is better.")
    if kind == "binary":
        return "Answer with a single word and nothing else: good or bad."
    raise ValueError(f"log-prob verdicts are for {' and '.join(LOGPROB_KINDS)} tasks, "
                     f"not {kind}")


def normalise_label(token: str) -> str:
    """A token's text as a label candidate: decoration stripped, upper case."""
    return token.strip(_DECORATION).upper()


@dataclass(frozen=True)
class LabelReading:
    """The labels' probabilities at the first position that lists one of them."""

    position: int
    probabilities: tuple[float, float]  # normalised over the two labels, in LABELS order
    bounded: tuple[str, ...] = ()  # labels absent from the list, given the bound


def read_labels(kind: str, positions: Sequence[Sequence[tuple[str, float]]]
                ) -> LabelReading | None:
    """The two labels' normalised probabilities from per-position top log-probabilities, or
    None when no position lists either label."""
    labels = LABELS[kind]
    for index, top in enumerate(positions):
        mass = [0.0, 0.0]
        listed = [False, False]
        for token, logprob in top:
            name = normalise_label(token)
            if name in labels and math.isfinite(logprob):
                which = labels.index(name)
                mass[which] += math.exp(logprob)  # " A" and "A" are both the label A
                listed[which] = True
        if not any(listed):
            continue
        floor = min(math.exp(lp) for _, lp in top if math.isfinite(lp))
        bounded = tuple(label for label, seen in zip(labels, listed, strict=True) if not seen)
        mass = [m if seen else floor for m, seen in zip(mass, listed, strict=True)]
        total = mass[0] + mass[1]
        return LabelReading(index, (mass[0] / total, mass[1] / total), bounded)
    return None


def _order_entry(shown_order: Sequence[int], reading: LabelReading | None,
                 kind: str) -> dict[str, Any]:
    if reading is None:
        return {"shown_order": list(shown_order), "valid": False, "error": "no_label_listed",
                "choice": None, "ranking": None, "confidence": None}
    first = reading.probabilities[0]
    choice = (("a" if first > 0.5 else "b" if first < 0.5 else "tie") if kind == "pairwise"
              else ("up" if first > 0.5 else "down"))
    return {"shown_order": list(shown_order), "valid": True, "error": None, "choice": choice,
            "ranking": None, "confidence": max(first, 1 - first), "p_first": first,
            "position": reading.position, "bounded": list(reading.bounded)}


def combine_pairwise_logprobs(readings: Sequence[tuple[tuple[int, ...], LabelReading | None]]
                              ) -> Decision:
    """Per-order label readings -> one canonical label: the mean over the readable orders of
    P(canonical response a is better), as RLAIF averages both orders.

    The verdict is a when that mean is above 0.5, b below, tie at exactly 0.5; the confidence
    is max(p, 1 - p). No readable order at all: an invalid label.
    """
    orders = [_order_entry(order, reading, "pairwise") for order, reading in readings]
    details: dict[str, Any] = {"mode": "logprobs", "orders": orders}
    first_order = readings[0][0] if readings else None
    canonical_a = [reading.probabilities[0] if order[0] == 0 else reading.probabilities[1]
                   for order, reading in readings if reading is not None]
    if not canonical_a:
        return Decision(None, None, first_order, {**details, "reason": "invalid_output",
                                                  "errors": ["no_label_listed"]})
    p_a = sum(canonical_a) / len(canonical_a)
    choice = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
    valid = [o for o in orders if o["valid"]]
    if len(valid) == 2:
        details["consistent"] = len({pairwise_to_canonical(o["choice"], o["shown_order"])
                                     for o in valid}) == 1
    details["p_a"] = p_a
    return Decision({"choice": choice}, max(p_a, 1 - p_a), first_order, details)


def combine_binary_logprobs(reading: LabelReading | None) -> Decision:
    """One binary reading -> up when P(good) > 0.5, else down; confidence max(p, 1 - p)."""
    entry = _order_entry((0,), reading, "binary")
    details: dict[str, Any] = {"mode": "logprobs", "orders": [entry]}
    if reading is None:
        return Decision(None, None, (0,), {**details, "reason": "invalid_output",
                                           "errors": ["no_label_listed"]})
    p_up = reading.probabilities[0]
    details["p_up"] = p_up
    return Decision({"choice": entry["choice"]}, max(p_up, 1 - p_up), (0,), details)
