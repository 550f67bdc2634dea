"""Rule judges: model-free checks that score each response in [0, 1], composable with weights.

The checks themselves are the verifiable rewards of training.verifiable (DeepSeek-R1-Zero's
accuracy and format rewards, plus length limits, JSON validity and any regex); online RL scores
with the same ones. A rule judge's score is the weighted mean of its applicable checks; the score
then decides a pairwise, listwise or binary label. Everything here is pure.

    [[checks]]            # in a judge TOML with kind = "rule"
    type = "answer_match"
    mode = "numeric"
    extract = "<answer>(.*?)</answer>"
"""

from __future__ import annotations

from collections.abc import Sequence

from feedback.config import RuleJudgeConfig
from feedback.judge import Decision
from training.verifiable import score_response


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
