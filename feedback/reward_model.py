"""Reward-model judge: score each response with a trained scalar reward model, then decide.

    # judges/rm.toml
    kind = "reward_model"
    name = "rm-round3"
    model_path = "runs/rm/round_3/final"

The model is a Hugging Face `AutoModelForSequenceClassification` folder with one label (what
prefloop's reward-model training saves). Inputs are encoded as training encodes them (text:
prompt + response + EOS as one string; chat: the tokenizer's chat template), and the reward is
the score head on the last token's hidden state (training.rewards.RewardModelScorer, which the
online trainers use too).
Pairwise confidence is the Bradley-Terry probability sigmoid(|r_a - r_b|) of the preferred
response. `decide_from_rewards` is pure; the scorer is the only part that loads torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from feedback.judge import Decision


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def decide_from_rewards(kind: str, rewards: Sequence[float], *, tie_margin: float = 0.0,
                        binary_threshold: float = 0.0) -> Decision:
    """Rewards (canonical order) -> a label. Non-finite rewards make the label invalid."""
    details: dict[str, Any] = {"rewards": list(rewards)}
    if not rewards or not all(math.isfinite(r) for r in rewards):
        return Decision(None, None, None, {**details, "reason": "non_finite_reward"})
    if kind == "binary":
        reward = rewards[0]
        choice = "up" if reward >= binary_threshold else "down"
        return Decision({"choice": choice}, _sigmoid(abs(reward - binary_threshold)), None,
                        details)
    if kind == "pairwise":
        a, b = rewards
        if abs(a - b) <= tie_margin:
            return Decision({"choice": "tie"}, None, None, details)
        return Decision({"choice": "a" if a > b else "b"}, _sigmoid(abs(a - b)), None, details)
    distinct = sorted(set(rewards), reverse=True)
    ranks = [distinct.index(r) + 1 for r in rewards]
    pairs = [_sigmoid(abs(rewards[i] - rewards[j]))
             for i, j in combinations(range(len(rewards)), 2)]
    return Decision({"ranks": ranks, "ratings": list(rewards)}, sum(pairs) / len(pairs), None,
                    details)


class RewardScorer:
    """Loads the reward model once and scores (prompt, response) pairs on CPU.

    The model, its encoding and its score head are training.rewards.RewardModelScorer's, the
    same ones the online trainers reward with, so a judge and a trainer give one response the
    same reward.
    """

    def __init__(self, model_path: str, *, max_length: int = 2048):
        from training.rewards import RewardModelScorer

        self.scorer = RewardModelScorer.load(model_path, max_length=max_length)
        self.model = self.scorer.model
        self.encode = self.scorer.encode  # (prompt, response) -> the token ids that are scored

    def score(self, prompt: Any, responses: Sequence[str]) -> list[float]:
        count = len(responses)
        return [float(r) for r in self.scorer([prompt] * count, list(responses), [None] * count)]
