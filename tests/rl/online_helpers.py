"""Helpers shared by the end-to-end tests of the online algorithms (not a test module)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TINY_OVERRIDES = [
    "iterations=2", "prompts_per_iteration=4", "samples_per_prompt=4", "max_new_tokens=8",
    "precision=fp32", "rollout_dtype=float32", "learning_rate=1e-3", "micro_batch_size=8",
    "progress=false", "rollout_threads=1", "rollout_batch_size=16",
]


def word_reward(prompts: Sequence[Any], texts: Sequence[str],
                answers: Sequence[str | None]) -> list[float]:
    """A deterministic reward with spread on random text: distinct characters / 10."""
    return [len(set(text)) / 10 for text in texts]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sequence_logp(model: Any, tokenizer: Any, prompt: Any, completion_ids: list[int]) -> float:
    """Teacher-forced sum of log pi(completion | prompt) at temperature 1."""
    from training.rollout import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(logprobs.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).sum())


def max_weight_change(model_dir: Path, initial_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    before = AutoModelForCausalLM.from_pretrained(initial_dir).state_dict()
    return max(float((after[k] - before[k]).abs().max()) for k in before)
