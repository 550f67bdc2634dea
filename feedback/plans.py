"""What an LLM judge asks for one task, and how the answers become one decision.

    specs = plan_calls(config, task, annotator_name)   # then send each spec's messages
    decision = decide_llm(config, task, specs, results)

Pure glue between a `JudgeTask` and the pure core (feedback/judge.py): `plan_calls` picks the
shown orders (seeded per task, so a rerun shows the same orders) and builds each call's
messages with a fresh nonce that occurs in no candidate; `decide_llm` parses each output
strictly and combines the orders. The batch runner (feedback/batch.py) sends the calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feedback.config import LLMJudgeConfig
from feedback.judge import (
    Decision,
    OrderResult,
    build_messages,
    combine_binary,
    combine_listwise,
    combine_pairwise,
    make_nonce,
    parse_verdict,
    permute,
    seeded_orders,
    token_confidence,
    verdict_schema,
)
from feedback.label_logprobs import (
    combine_binary_logprobs,
    combine_pairwise_logprobs,
    label_instructions,
    read_labels,
)
from feedback.llm import CallResult
from feedback.tasks import JudgeTask


@dataclass(frozen=True)
class CallSpec:
    """One call to the endpoint: the order the responses are shown in and the messages."""

    shown_order: tuple[int, ...]
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    candidates: tuple[str, ...]  # shown order, for the copied-verdict check


def plan_calls(config: LLMJudgeConfig, view: JudgeTask, annotator_name: str) -> list[CallSpec]:
    """The calls a task needs: both orders (pairwise), seeded shuffles (listwise) or one."""
    k = len(view.responses)
    seed_material = f"{config.seed}|{annotator_name}|{view.task_key}"
    if view.kind == "pairwise":
        orders = seeded_orders(2, 2, seed_material=seed_material)
        if not config.both_orders:
            # One order, chosen by a seeded coin per task (AlpacaEval randomises the order).
            digest = hashlib.sha256(seed_material.encode()).digest()
            orders = [orders[digest[0] % 2]]
    elif view.kind == "listwise":
        orders = seeded_orders(k, config.listwise_shuffles, seed_material=seed_material)
    else:
        orders = [(0,)]
    specs = []
    for order in orders:
        shown = permute(view.responses, order)
        nonce = make_nonce()
        while any(nonce in text for text in shown) or nonce in view.question:
            nonce = make_nonce()
        answer_format = (label_instructions(view.kind) if config.verdict == "logprobs"
                         else None)
        messages = build_messages(config.rubric, view.kind, question=view.question,
                                  shown_texts=shown, nonce=nonce,
                                  principles=config.constitution, reference=view.reference,
                                  answer_format=answer_format)
        specs.append(CallSpec(tuple(order), messages, verdict_schema(view.kind, k),
                              tuple(shown)))
    return specs


def decide_llm(config: LLMJudgeConfig, view: JudgeTask, specs: Sequence[CallSpec],
               results: Sequence[CallResult]) -> Decision:
    """Parse each call's output strictly (or read its label probabilities, in log-prob mode)
    and combine the orders into one decision."""
    if config.verdict == "logprobs":
        readings = [(spec.shown_order, read_labels(view.kind, result.top or ()))
                    for spec, result in zip(specs, results, strict=True)]
        if view.kind == "pairwise":
            return combine_pairwise_logprobs(readings)
        return combine_binary_logprobs(readings[0][1])
    orders = []
    for spec, result in zip(specs, results, strict=True):
        verdict = parse_verdict(view.kind, len(view.responses), result.text, spec.candidates)
        confidence = None
        if verdict.valid and result.tokens and result.text is not None:
            confidence = token_confidence(result.tokens, result.text, verdict.value_offset)
        orders.append(OrderResult(spec.shown_order, verdict, confidence))
    if view.kind == "pairwise":
        return combine_pairwise(orders, on_inconsistent=config.on_inconsistent)
    if view.kind == "listwise":
        return combine_listwise(orders)
    return combine_binary(orders)


__all__ = ["CallSpec", "decide_llm", "plan_calls"]
