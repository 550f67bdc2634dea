"""The verifiable-reward checks of training/verifiable.py against hand-computed values."""

from __future__ import annotations

import pytest

from training.config_reader import ConfigError
from training.verifiable import (
    CheckConfig,
    check_score,
    normalise_answer,
    parse_number,
    score_response,
)

ANSWER = CheckConfig(type="answer_match", mode="numeric", extract=r"<answer>(.*?)</answer>")
FORMAT = CheckConfig(type="format")  # the R1-Zero layout by default


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42.0), ("-3.5", -3.5), ("1,234", 1234.0), ("3/4", 0.75), ("$12", 12.0),
    ("50%", 50.0), (r"\boxed{7}", 7.0), ("so the answer is 12.", 12.0), ("1e3", 1000.0),
    ("no number", None), ("", None),
])
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


def test_normalise_answer() -> None:
    assert normalise_answer('  "Paris."  ') == "paris"
    assert normalise_answer("New   York") == "new york"


def test_r1_zero_accuracy_and_format_rewards() -> None:
    good = "<think>6 times 7</think> <answer>42</answer>"
    assert check_score(FORMAT, good, None) == 1.0
    assert check_score(ANSWER, good, "42") == 1.0
    assert check_score(ANSWER, good, "42.0000001") == 1.0  # within the tolerance
    assert check_score(ANSWER, good, "41") == 0.0
    assert check_score(ANSWER, "42", "42") == 0.0  # no <answer> tag: nothing to extract
    assert check_score(FORMAT, "42 <answer>42</answer>", None) == 0.0
    assert check_score(ANSWER, good, None) is None  # no reference: does not apply


def test_exact_regex_length_json_checks() -> None:
    exact = CheckConfig(type="answer_match", mode="exact")
    assert check_score(exact, "Paris.", "paris") == 1.0
    assert check_score(exact, "Lyon", "paris") == 0.0
    no_url = CheckConfig(type="regex", pattern=r"https?://", must_match=False)
    assert check_score(no_url, "see http://x", None) == 0.0
    assert check_score(no_url, "plain", None) == 1.0
    length = CheckConfig(type="length", min_chars=2, max_chars=5)
    assert [check_score(length, t, None) for t in ("a", "ab", "abcde", "abcdef")] == [
        0.0, 1.0, 1.0, 0.0]
    js = CheckConfig(type="json_valid", required_keys=("name",))
    assert check_score(js, '{"name": 1}', None) == 1.0
    assert check_score(js, '```json\n{"name": 1}\n```', None) == 1.0
    assert check_score(js, '{"other": 1}', None) == 0.0
    assert check_score(js, '{"name": ', None) == 0.0


def test_weighted_score_skips_checks_that_do_not_apply() -> None:
    checks = (ANSWER.__class__(**{**ANSWER.__dict__, "weight": 3.0}), FORMAT)
    text = "<think>x</think><answer>7</answer>"
    assert score_response(checks, text, "8").score == pytest.approx(1 / 4)
    assert score_response(checks, text, "7").score == 1.0
    assert score_response(checks, text, None).score == 1.0  # only the format check applies
    assert score_response((ANSWER,), text, None).score is None


def test_check_config_validation() -> None:
    with pytest.raises(ConfigError, match="pattern"):
        CheckConfig(type="regex")
    with pytest.raises(ConfigError, match="bad regex"):
        CheckConfig(type="regex", pattern="(")
    with pytest.raises(ConfigError, match="weight"):
        CheckConfig(type="length", weight=0)
