"""Reward sources for online RL: rule checks, a trained reward model, or a weighted mix.

A spec string names the source (the same in configs, the CLI and the rounds):

    rule:format+accuracy                        verifiable rewards (DeepSeek-R1 style)
    rm:runs/rm1                                 a `prefloop train rm` run folder (or its model/)
    rule:format+accuracy*0.5,rm:runs/rm1*0.5    a weighted sum

Rules are the model-free checks of training.verifiable (pure; the rule judges use them too):
"format" = the response ends with one <answer>...</answer> block; "accuracy" = the number inside
it equals the prompt's reference answer; "r1-format" = DeepSeek-R1's
<think>...</think><answer>...</answer> layout. A rule spec scores the mean of its checks that
apply (accuracy does not apply without a reference), in [0, 1]. The reward model scores the
last token of prompt + response, as it was trained (training.logprobs.sequence_rewards).

    python -c "from training.rewards import make_reward as m; \
print(m('rule:format+accuracy')(['q'], ['It is 7. <answer>7</answer>'], ['7']))"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.rollout import PromptInput
from training.verifiable import R1_FORMAT, CheckConfig, score_response

RewardFn = Callable[[Sequence[PromptInput], Sequence[str], Sequence[str | None]], list[float]]
"""RewardFn(prompts, texts, answers) -> one float per text (answers: references or None)."""

ANSWER_TAG = r"<answer>(.*?)</answer>"
# One final tagged answer: anything without an <answer> tag, then the tag, then only whitespace.
ANSWER_FORMAT = r"\A(?:(?!<answer>).)*<answer>[^<>]*</answer>\s*\Z"

RULE_CHECKS: dict[str, CheckConfig] = {
    "format": CheckConfig(type="format", pattern=ANSWER_FORMAT),
    "r1-format": CheckConfig(type="format", pattern=R1_FORMAT),
    "accuracy": CheckConfig(type="answer_match", mode="numeric", extract=ANSWER_TAG),
    "exact": CheckConfig(type="answer_match", mode="exact", extract=ANSWER_TAG),
}


class RewardSpecError(ValueError):
    """A reward spec that cannot be built (unknown rule, missing reward model, bad weight)."""


def rule_reward(name: str) -> RewardFn:
    """A rule reward: `name` joins checks with "+" (format, accuracy, r1-format, exact)."""
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in RULE_CHECKS]
    if not parts or unknown:
        raise RewardSpecError(f"unknown rule check(s) {unknown or [name]}; "
                              f"known: {', '.join(RULE_CHECKS)}")
    checks = tuple(RULE_CHECKS[p] for p in parts)

    def score(prompts: Sequence[PromptInput], texts: Sequence[str],
              answers: Sequence[str | None]) -> list[float]:
        del prompts  # rules read only the response and the reference
        return [float(score_response(checks, text, answer).score or 0.0)
                for text, answer in zip(texts, answers, strict=True)]

    return score


def reward_model_folder(path: str) -> Path:
    """The model folder of a reward model: a `prefloop train rm` run dir (its model/) or a
    Hugging Face folder (full weights or a LoRA adapter)."""
    folder = Path(path).expanduser()
    inner = folder / "model"
    # A run folder also holds a config.json (its TrainConfig), so "has config.json" does not tell
    # a model folder from a run folder: holding weights or an adapter does.
    holds_model = (folder / "adapter_config.json").exists() or any(
        folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if not holds_model and ((inner / "config.json").exists()
                            or (inner / "adapter_config.json").exists()):
        folder = inner
    if not ((folder / "config.json").exists() or (folder / "adapter_config.json").exists()):
        raise RewardSpecError(f"reward model {path!r}: no model folder (config.json or "
                              "adapter_config.json) found")
    return folder


@dataclass
class RewardModelScorer:
    """A scalar reward model (AutoModelForSequenceClassification, 1 label), loaded once.

    Encoding matches training: a chat prompt gets the chat template with the response as the
    assistant turn; a text prompt is prompt + response + EOS as one string.
    """

    model: Any
    tokenizer: Any
    batch_size: int = 16
    max_length: int = 1024

    @classmethod
    def load(cls, path: str, *, batch_size: int = 16, max_length: int = 1024
             ) -> RewardModelScorer:
        import torch
        from transformers import AutoModelForSequenceClassification

        from training.models import load_adapter, load_tokenizer

        folder = reward_model_folder(path)
        tokenizer = load_tokenizer(str(folder))
        if (folder / "adapter_config.json").exists():
            model = load_adapter(folder, AutoModelForSequenceClassification, num_labels=1,
                                 dtype=torch.float32)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.eval(), tokenizer, batch_size, max_length)

    def encode(self, prompt: PromptInput, response: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list):
            messages = [*prompt, {"role": "assistant", "content": response}]
            text = tok.apply_chat_template(messages, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            eos = tok.eos_token or ""
            ids = tok(prompt + response + ("" if response.endswith(eos) else eos))["input_ids"]
        return list(ids[-self.max_length:])

    def __call__(self, prompts: Sequence[PromptInput], texts: Sequence[str],
                 answers: Sequence[str | None]) -> list[float]:
        import torch

        from training.logprobs import sequence_rewards

        del answers
        encoded = [self.encode(p, t) for p, t in zip(prompts, texts, strict=True)]
        scores: list[float] = []
        pad = int(self.tokenizer.pad_token_id)
        with torch.inference_mode():
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start : start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):  # right padding, read at the last real token
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                scores.extend(sequence_rewards(self.model, input_ids, mask).tolist())
        return scores


def parse_reward_spec(spec: str) -> list[tuple[str, str, float]]:
    """Split a spec into (kind, argument, weight) terms; weights default to 1."""
    terms: list[tuple[str, str, float]] = []
    for raw in (t.strip() for t in spec.split(",")):
        if not raw:
            continue
        body, weight = raw, 1.0
        if "*" in raw:
            head, tail = raw.rsplit("*", 1)
            try:
                body, weight = head, float(tail)
            except ValueError:
                body, weight = raw, 1.0
        kind, sep, argument = body.partition(":")
        if not sep or kind not in ("rule", "rm") or not argument:
            raise RewardSpecError(f"bad reward term {raw!r}: use rule:<checks> or rm:<path>, "
                                  "optionally *<weight>")
        terms.append((kind, argument, weight))
    if not terms:
        raise RewardSpecError("empty reward spec")
    return terms


def make_reward(spec: str) -> RewardFn:
    """Build the reward function of a spec (see the module docstring)."""
    parts: list[tuple[RewardFn, float]] = []
    for kind, argument, weight in parse_reward_spec(spec):
        source: RewardFn = (rule_reward(argument) if kind == "rule"
                            else RewardModelScorer.load(argument))
        parts.append((source, weight))
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]

    def combined(prompts: Sequence[PromptInput], texts: Sequence[str],
                 answers: Sequence[str | None]) -> list[float]:
        total = [0.0] * len(texts)
        for source, weight in parts:
            for i, value in enumerate(source(prompts, texts, answers)):
                total[i] += weight * value
        return total

    return combined


__all__ = ["ANSWER_FORMAT", "RULE_CHECKS", "RewardFn", "RewardModelScorer", "RewardSpecError",
           "make_reward", "parse_reward_spec", "reward_model_folder", "rule_reward"]
