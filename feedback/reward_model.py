"""Reward-model judge: score each response with a trained scalar reward model, then decide.

    # judges/rm.toml
    kind = "reward_model"
    name = "rm-round3"
    model_path = "runs/rm/round_3/final"

The model is a Hugging Face `AutoModelForSequenceClassification` folder with one label (what
prefloop's reward-model training saves). Inputs are encoded as training encodes them (text:
prompt + response + EOS as one string; chat: the tokenizer's chat template), and the reward is
the score head on the last token's hidden state, as in training.logprobs.sequence_rewards.
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
    """Loads the reward model once and scores (prompt, response) pairs on CPU."""

    def __init__(self, model_path: str, *, max_length: int = 2048):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        self.model.eval()
        self.max_length = max_length

    def encode(self, prompt: Any, response: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list):  # chat messages
            messages = [*prompt, {"role": "assistant", "content": response}]
            text = tok.apply_chat_template(messages, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            eos = tok.eos_token or ""
            ids = tok(prompt + response + ("" if response.endswith(eos) else eos))["input_ids"]
        return ids[-self.max_length:]

    def score(self, prompt: Any, responses: Sequence[str]) -> list[float]:
        torch = self.torch
        base = self.model
        backbone = getattr(base, base.base_model_prefix)
        rewards = []
        with torch.inference_mode():
            for response in responses:
                ids = torch.tensor([self.encode(prompt, response)])
                hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  use_cache=False)[0]
                rewards.append(float(base.score(hidden[:, -1]).squeeze()))
        return rewards
