"""Rule decisions (feedback/rules.py) against hand-computed values; the checks themselves are
tested in tests/training/test_verifiable.py."""

from __future__ import annotations

from feedback.config import RuleJudgeConfig
from feedback.rules import decide
from training.verifiable import CheckConfig

ANSWER = CheckConfig(type="answer_match", mode="numeric", extract=r"<answer>(.*?)</answer>")
FORMAT = CheckConfig(type="format")  # the R1-Zero layout by default


def test_rule_decisions_for_each_task_kind() -> None:
    config = RuleJudgeConfig(name="math", checks=(ANSWER, FORMAT), pass_threshold=0.5)
    right = "<think>t</think><answer>4</answer>"
    wrong_format = "<answer>4</answer>"  # answer right, format wrong: 0.5
    wrong = "<think>t</think><answer>5</answer>"  # format right, answer wrong: 0.5
    nothing = "four"
    assert decide(config, "pairwise", [right, wrong], "4").value == {"choice": "a"}
    assert decide(config, "pairwise", [wrong, right], "4").value == {"choice": "b"}
    assert decide(config, "pairwise", [wrong, wrong_format], "4").value == {"choice": "tie"}
    assert decide(config, "pairwise", [nothing, nothing], "4").value == {"choice": "both_bad"}
    assert decide(config, "binary", [right], "4").value == {"choice": "up"}
    assert decide(config, "binary", [nothing], "4").value == {"choice": "down"}
    listwise = decide(config, "listwise", [wrong, right, nothing], "4")
    assert listwise.value == {"ranks": [2, 1, 3], "ratings": [0.5, 1.0, 0.0]}
    only_answer = RuleJudgeConfig(name="acc", checks=(ANSWER,))
    invalid = decide(only_answer, "pairwise", [right, wrong], None)
    assert invalid.value is None and invalid.details["reason"] == "no_applicable_check"
