"""A seeded, verifiable task for online RL: small arithmetic with the answer in <answer></answer>.

The bundled SmolLM2-135M-Instruct produces the tagged answer only when the prompt shows one
example turn (PLATFORM.md section 13: 0 of 128 samples with the bare instruction, ~25 % with one
example), so each prompt is a short system line, one worked example, then the question. The short
system line replaces the chat template's default one, which would cost ~30 tokens per prompt.
Train and test problems are disjoint by construction (a hash of the operands picks the split).

    python -c "from training.tasks import make_arithmetic_prompts as m; print(m(2, 0, 'test'))"
"""

from __future__ import annotations

import random
from typing import Any, Literal

SYSTEM = "Answer briefly, then give the final number inside <answer></answer>."
EXAMPLE_QUESTION = "What is 3 + 4?"
EXAMPLE_ANSWER = "3 plus 4 is 7. <answer>7</answer>"
# Reward rule for this task: training.rewards "rule:format+accuracy".


def _split_of(a: int, b: int, op: str) -> str:
    return "test" if (a * 31 + b * 7 + (op == "-")) % 5 == 0 else "train"


def arithmetic_prompt(question: str) -> list[dict[str, str]]:
    """The chat messages of one question (system line, one example turn, the question)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": EXAMPLE_QUESTION},
        {"role": "assistant", "content": EXAMPLE_ANSWER},
        {"role": "user", "content": question},
    ]


def make_arithmetic_prompts(n: int, seed: int, split: Literal["train", "test"] | str,
                            *, max_operand: int = 30) -> list[dict[str, Any]]:
    """n distinct problems "What is a + b?" / "What is a - b?" (a >= b) of one split.

    Returns:
        Rows for a prompts JSONL file: {"prompt": [messages], "answer": "12", "id": "..."}.
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"arithmetic-{seed}-{split}")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, int, str]] = set()
    capacity = (max_operand + 1) ** 2 * 2
    while len(rows) < n:
        if len(seen) >= capacity:
            raise ValueError(f"only {len(rows)} distinct {split} problems with operands "
                             f"<= {max_operand}")
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        key = (a, b, op)
        if key in seen:
            continue
        seen.add(key)
        if _split_of(a, b, op) != split:
            continue
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": arithmetic_prompt(f"What is {a} {op} {b}?"),
                     "answer": str(answer), "id": f"{split}-{a}{op}{b}"})
    return rows


__all__ = ["SYSTEM", "arithmetic_prompt", "make_arithmetic_prompts"]
