"""The input and output of an online RL run: the prompts file, scored groups, the result.

GRPO, rejection sampling, online DPO (training.online) and PPO (training.ppo) read the same
prompts JSONL, one {"prompt": str | [messages], "answer": str (optional), "id": (optional)} per
line, every problem reported with its line; each iteration's samples of one prompt with their
rewards are a `Group`.

    python -c "from training.online_data import read_prompts; print(read_prompts('p.jsonl'))"
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.rollout import PromptInput, Rollout


class OnlineDataError(ValueError):
    """A prompts file that cannot be used (with the line number of the problem)."""


@dataclass(frozen=True)
class OnlineResult:
    """What a finished online run produced."""

    run_dir: Path
    model_dir: Path
    """A FULL Hugging Face model folder (tokenizer included), LoRA merged."""
    steps: int
    """Optimizer steps taken."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last iteration's metrics plus eval/reward_before and eval/reward_after."""


@dataclass(frozen=True)
class PromptRow:
    prompt: PromptInput
    answer: str | None
    id: str


IterationCallback = Callable[[int, dict[str, float]], None]


def read_prompts(path: str) -> list[PromptRow]:
    """Read and validate a prompts JSONL file; every problem is reported with its line."""
    file = Path(path)
    if not file.is_file():
        raise OnlineDataError(f"prompts file {path} does not exist")
    rows: list[PromptRow] = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise OnlineDataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise OnlineDataError(f"{path}:{number}: expected an object with a 'prompt'")
        prompt = obj["prompt"]
        is_chat = isinstance(prompt, list) and bool(prompt) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in prompt)
        if not (isinstance(prompt, str) and prompt) and not is_chat:
            raise OnlineDataError(f"{path}:{number}: 'prompt' must be a non-empty string or a "
                                  "list of {role, content} messages")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str | int | float):
            raise OnlineDataError(f"{path}:{number}: 'answer' must be a string")
        rows.append(PromptRow(prompt, None if answer is None else str(answer),
                              str(obj.get("id", number))))
    if not rows:
        raise OnlineDataError(f"{path} holds no prompts")
    return rows


def prompt_order(num_prompts: int, seed: int) -> Iterator[int]:
    """Prompt indices in a seeded order, reshuffled at every pass over the file."""
    epoch = 0
    while True:
        order = list(range(num_prompts))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        yield from order
        epoch += 1


# ----------------------------------------------------------------------------- batching


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


@dataclass
class Group:
    """The scored samples of one prompt in one iteration."""

    row: PromptRow
    dataset_index: int
    rollouts: list[Rollout]
    rewards: list[float]

    @property
    def prompt_ids(self) -> list[int]:
        return self.rollouts[0].prompt_ids


__all__ = ["Group", "IterationCallback", "OnlineDataError", "OnlineResult", "PromptRow",
           "chunks", "prompt_order", "read_prompts"]
