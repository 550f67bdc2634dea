"""Verifiable rewards: model-free checks that score one response in [0, 1].

The checks are the verifiable rewards of DeepSeek-R1-Zero (DeepSeek-AI 2025, arXiv 2501.12948,
Sec. 2.2.2): an accuracy reward (the final answer matches a reference, exactly or numerically)
and a format reward (the response follows a required layout such as
`<think>...</think><answer>...</answer>`), plus length limits, JSON validity and any regex. A
response's score is the weighted mean of its applicable checks. Everything here is pure; the rule
reward of online RL (training.rewards) and the rule judge (feedback.rules) both score with it.

    python -c "from training.verifiable import CheckConfig as C, score_response as s; \
print(s([C(type='format')], '<think>x</think><answer>4</answer>', None))"
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from training.config_reader import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    _check(value in allowed, f"{what} must be one of {', '.join(allowed)}, not {value!r}")


CheckType = Literal["regex", "format", "answer_match", "length", "json_valid"]
CHECK_TYPES: tuple[str, ...] = ("regex", "format", "answer_match", "length", "json_valid")


@dataclass(frozen=True)
class CheckConfig:
    """One rule check; which fields apply depends on `type` (see check_score below)."""

    type: CheckType
    weight: float = 1.0
    pattern: str | None = None
    """regex: the pattern that must (or must not) match; format: the whole-response pattern."""
    must_match: bool = True
    mode: Literal["exact", "numeric"] = "exact"
    """answer_match: compare as normalised strings or as numbers."""
    extract: str | None = None
    """answer_match: regex whose group 1 is the answer (default: the whole response)."""
    tolerance: float = 1e-6
    """answer_match numeric: absolute tolerance."""
    min_chars: int = 0
    max_chars: int | None = None
    required_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice(self.type, CHECK_TYPES, "check type")
        _check(self.weight > 0, "check weight must be positive")
        _check_choice(self.mode, ("exact", "numeric"), "answer_match mode")
        if self.type == "regex":
            _check(bool(self.pattern), "a regex check needs a pattern")
        if self.type == "length":
            _check(self.min_chars >= 0 and (self.max_chars is None or
                                            self.max_chars >= self.min_chars),
                   "length check needs 0 <= min_chars <= max_chars")
        for pattern in (self.pattern, self.extract):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"bad regex {pattern!r}: {exc}") from None


# The R1-Zero layout: reasoning in <think>, the final answer in <answer>, nothing else around.
R1_FORMAT = r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z"
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")


def normalise_answer(text: str) -> str:
    """Exact-match normal form: casefold, collapse spaces, drop surrounding quotes and a final
    period (so "Paris." matches "paris")."""
    text = re.sub(r"\s+", " ", text).strip().casefold()
    text = text.strip("\"'`")
    return text.rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """A number from an answer: "1,234", "-3.5", "3/4", "$12", "50%" (as 50), "\\boxed{7}".

    The whole answer is tried first; otherwise the last number in it (how math graders read a
    sentence that ends with the result). None when there is no number.
    """
    cleaned = text.strip()
    boxed = re.search(r"\\boxed\{([^{}]*)\}", cleaned)
    if boxed:
        cleaned = boxed.group(1)
    cleaned = cleaned.replace("$", "").replace("%", "").strip().rstrip(".")
    candidates = [cleaned] if _NUMBER.fullmatch(cleaned) else _NUMBER.findall(cleaned)[-1:]
    if not candidates:
        return None
    token = candidates[0].replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return float(Fraction(numerator) / Fraction(denominator))
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _json_object(text: str) -> object | None:
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return None


def check_score(check: CheckConfig, text: str, reference: str | None) -> float | None:
    """One check's score in [0, 1], or None when it does not apply (no reference to match)."""
    if check.type == "regex":
        found = re.search(check.pattern or "", text, re.DOTALL) is not None
        return 1.0 if found == check.must_match else 0.0
    if check.type == "format":
        matched = re.fullmatch(check.pattern or R1_FORMAT, text, re.DOTALL) is not None
        return 1.0 if matched else 0.0
    if check.type == "length":
        n = len(text)
        return 1.0 if n >= check.min_chars and (check.max_chars is None or
                                                 n <= check.max_chars) else 0.0
    if check.type == "json_valid":
        obj = _json_object(text)
        if obj is None:
            return 0.0
        if check.required_keys:
            return 1.0 if isinstance(obj, dict) and all(k in obj for k in
                                                         check.required_keys) else 0.0
        return 1.0
    # answer_match
    if reference is None or not reference.strip():
        return None
    answer = text
    if check.extract:
        match = re.search(check.extract, text, re.DOTALL)
        if match is None:
            return 0.0
        answer = match.group(1) if match.groups() else match.group(0)
    if check.mode == "numeric":
        got, want = parse_number(answer), parse_number(reference)
        if got is None or want is None:
            return 0.0
        return 1.0 if abs(got - want) <= check.tolerance else 0.0
    return 1.0 if normalise_answer(answer) == normalise_answer(reference) else 0.0


@dataclass(frozen=True)
class RuleScore:
    score: float | None  # None: no check applied
    per_check: tuple[float | None, ...]


def score_response(checks: Sequence[CheckConfig], text: str, reference: str | None
                   ) -> RuleScore:
    """The weighted mean of the applicable checks."""
    per_check = tuple(check_score(c, text, reference) for c in checks)
    applied = [(c.weight, s) for c, s in zip(checks, per_check, strict=True) if s is not None]
    if not applied:
        return RuleScore(None, per_check)
    total = sum(w for w, _ in applied)
    return RuleScore(sum(w * s for w, s in applied) / total, per_check)


__all__ = ["CHECK_TYPES", "R1_FORMAT", "CheckConfig", "CheckType", "RuleScore", "check_score",
           "normalise_answer", "parse_number", "score_response"]
