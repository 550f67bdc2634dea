"""Stage 7, decide: promote the candidate if the gate judge's win rate clears the threshold
(with enough decisive verdicts behind it), else reject it; the promotion or rejection
(store/deployments.py) is written in the transaction of the round's final advance.

    prefloop round run --set evaluate.win_rate_threshold=0.6 --set evaluate.min_decisive=6
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.decision import promotion_decision
from loop.stages.common import StageContext, StageResult
from store.models import Round


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """Promote the candidate if its win rate clears the threshold, else reject it."""
    from store import deployments

    metrics = rnd.metrics or {}
    train, evaluation = metrics.get("train", {}), metrics.get("evaluate", {})
    threshold = config.evaluate.win_rate_threshold
    if "candidate_id" not in train:
        return StageResult({"decision": "rejected", "reason": train.get("skipped")},
                           to="rejected")
    promote, reason = promotion_decision(
        evaluation.get("win_rate"), int(evaluation.get("decisive", 0)),
        threshold=threshold, min_decisive=config.evaluate.min_decisive,
        ties=config.evaluate.ties)
    candidate_id, actor = int(train["candidate_id"]), f"round:{rnd.id}"

    def write(session: Session) -> dict[str, Any]:
        if promote:
            deployments.promote(session, policy_id=candidate_id, actor=actor)
        else:
            deployments.reject(session, policy_id=candidate_id, actor=actor, reason=reason)
        now = deployments.deployed(session)
        return {"deployed_id": now.id if now else None}

    return StageResult({"decision": "promoted" if promote else "rejected",
                        "reason": reason, "threshold": threshold}, write,
                       to="promoted" if promote else "rejected")
