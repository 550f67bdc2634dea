"""Rule judges: model-free checks that score each response in [0, 1], composable with weights.

The checks are the verifiable rewards of DeepSeek-R1-Zero (DeepSeek-AI 2025, arXiv 2501.12948,
Sec. 2.2.2): an accuracy reward (the final answer matches a reference, exactly or numerically)
and a format reward (the response follows a required layout such as
`<think>...</think><answer>...</answer>`), plus length limits, JSON validity and any regex. A
rule judge's score is the weighted mean of its applicable checks; the score then decides a
pairwise, listwise or binary label. Everything here is pure.

    [[checks]]            # in a judge TOML with kind = "rule"
    type = "answer_match"
    mode = "numeric"
    extract = "<answer>(.*?)</answer>"
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from feedback.config import CheckConfig, RuleJudgeConfig
from feedback.judge import Decision

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


def decide(config: RuleJudgeConfig, kind: str, responses: Sequence[str],
           reference: str | None) -> Decision:
    """Score every response and turn the scores into a canonical label."""
    scores = [score_response(config.checks, r, reference) for r in responses]
    details = {"scores": [s.score for s in scores],
               "checks": [[c.type for c in config.checks]] + [list(s.per_check) for s in scores]}
    if any(s.score is None for s in scores):
        return Decision(None, None, None, {**details, "reason": "no_applicable_check"})
    values = [float(s.score or 0.0) for s in scores]
    if kind == "binary":
        choice = "up" if values[0] >= config.pass_threshold else "down"
        return Decision({"choice": choice}, None, None, details)
    if kind == "pairwise":
        a, b = values
        if a < config.pass_threshold and b < config.pass_threshold:
            choice = "both_bad"
        elif a == b:
            choice = "tie"
        else:
            choice = "a" if a > b else "b"
        return Decision({"choice": choice}, None, None, details)
    distinct = sorted(set(values), reverse=True)
    ranks = [distinct.index(v) + 1 for v in values]
    # Rules read every response at once and show nothing: no shown_order is recorded.
    return Decision({"ranks": ranks, "ratings": values}, None, None, details)
