"""The log-probability verdict (feedback/label_logprobs.py) on hand-computed values, the
tolerant token alignment of the generated verdict's confidence (llama.cpp's fenced tokens), the
config rules, and one judge run end to end against prefloop's own /v1 serving a tiny model."""

from __future__ import annotations

import asyncio
import math

import pytest

from feedback.config import JudgeConfigError, LLMJudgeConfig
from feedback.judge import parse_verdict, token_confidence
from feedback.label_logprobs import (
    LABEL_MAX_TOKENS,
    combine_binary_logprobs,
    combine_pairwise_logprobs,
    normalise_label,
    read_labels,
)
from feedback.llm import parse_completion
from feedback.rubric import load_rubric
from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)
from tests.app.serving_fixtures import deploy_and_serve

ln = math.log


def test_labels_are_read_through_decoration_and_summed_over_spellings():
    assert [normalise_label(t) for t in (" A", "**B", "`a`", '"B".', "Good", " bad\n")] == [
        "A", "B", "A", "B", "GOOD", "BAD"]
    # " A" and "A" both mean A: 0.3 + 0.2 against 0.25 -> 0.5 / 0.75.
    reading = read_labels("pairwise", [[(" A", ln(0.3)), ("B", ln(0.25)), ("A", ln(0.2))]])
    assert reading is not None and reading.position == 0 and reading.bounded == ()
    assert reading.probabilities == pytest.approx((0.5 / 0.75, 0.25 / 0.75))


def test_the_first_position_listing_a_label_is_read_and_a_missing_label_gets_the_bound():
    positions = [[("```", ln(0.9)), ("{", ln(0.1))],          # a fence first: no label here
                 [("A", ln(0.6)), ("The", ln(0.3)), ("x", ln(0.05))]]
    reading = read_labels("pairwise", positions)
    assert reading is not None and reading.position == 1 and reading.bounded == ("B",)
    # B is not listed: at most as likely as the least likely listed token (0.05).
    assert reading.probabilities == pytest.approx((0.6 / 0.65, 0.05 / 0.65))
    assert read_labels("pairwise", [[("The", ln(0.9))], [("answer", ln(0.8))]]) is None
    assert read_labels("binary", [[("good", ln(0.2)), ("bad", ln(0.6))]]).probabilities == \
        pytest.approx((0.25, 0.75))


def test_both_orders_are_averaged_in_canonical_terms():
    # Order (0, 1): P(shown first = canonical a) = 0.8; order (1, 0): P(shown first =
    # canonical b) = 0.4, so P(a) = 0.6 there. Mean P(a) = 0.7 -> a, confidence 0.7.
    first = read_labels("pairwise", [[("A", ln(0.8)), ("B", ln(0.2))]])
    swapped = read_labels("pairwise", [[("A", ln(0.4)), ("B", ln(0.6))]])
    decision = combine_pairwise_logprobs([((0, 1), first), ((1, 0), swapped)])
    assert decision.value == {"choice": "a"}
    assert decision.confidence == pytest.approx(0.7)
    assert decision.details["p_a"] == pytest.approx(0.7)
    assert decision.details["consistent"] is True
    assert [o["choice"] for o in decision.details["orders"]] == ["a", "b"]  # shown positions
    # Position bias: "A" (shown first) wins at 0.9 in both orders -> P(a) = (0.9 + 0.1) / 2.
    biased = read_labels("pairwise", [[("A", ln(0.9)), ("B", ln(0.1))]])
    tie = combine_pairwise_logprobs([((0, 1), biased), ((1, 0), biased)])
    assert (tie.value, tie.confidence, tie.details["consistent"]) == (
        {"choice": "tie"}, pytest.approx(0.5), False)


def test_an_unreadable_order_is_left_out_and_no_readable_order_is_invalid():
    swapped = read_labels("pairwise", [[("A", ln(0.3)), ("B", ln(0.7))]])
    one = combine_pairwise_logprobs([((0, 1), None), ((1, 0), swapped)])
    assert (one.value, one.confidence) == ({"choice": "a"}, pytest.approx(0.7))
    assert "consistent" not in one.details
    assert one.details["orders"][0]["error"] == "no_label_listed"
    none = combine_pairwise_logprobs([((0, 1), None), ((1, 0), None)])
    assert none.value is None and none.details["reason"] == "invalid_output"
    binary = combine_binary_logprobs(read_labels("binary", [[("bad", ln(0.9))], ]))
    assert binary.value == {"choice": "down"}
    assert combine_binary_logprobs(None).value is None


def test_top_logprobs_are_parsed_from_a_chat_completion_body():
    body = {"choices": [{"message": {"content": "A"}, "finish_reason": "length", "logprobs": {
        "content": [{"token": "A", "logprob": -0.1, "top_logprobs": [
            {"token": "A", "logprob": -0.1}, {"token": "B", "logprob": -2.5}]}]}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1}}
    result = parse_completion(body)
    assert result.top == ((("A", -0.1), ("B", -2.5)),)
    assert result.tokens == (("A", -0.1),)
    broken = {"choices": [{"message": {"content": "A"}, "logprobs": {
        "content": [{"token": "A", "logprob": -0.1, "top_logprobs": [{"x": 1}]}]}}]}
    assert parse_completion(broken).top is None


def test_confidence_aligns_with_tokens_that_include_a_stripped_code_fence():
    # llama.cpp's server: the content lost its ```json fence, the log-prob tokens did not.
    content = '{"reasoning": "ok", "verdict": "B"}'
    tokens = [("```", -0.01), ("json", -0.01), ("\n", -0.01), ('{"', -0.1), ("reason", -0.1),
              ('ing": "ok", "', -0.1), ("verdict", -0.1), ('": "', -0.1), ("B", ln(0.8)),
              ('"}', -0.1), ("\n```", -0.01)]
    verdict = parse_verdict("pairwise", 2, content)
    assert verdict.valid and verdict.choice == "b"
    assert token_confidence(tokens, content, verdict.value_offset) == pytest.approx(0.8)
    # Exact tokens still work; tokens for some other text give no confidence.
    exact = [(content[:-3], -0.1), ("B", ln(0.7)), ('"}', -0.1)]
    assert token_confidence(exact, content, verdict.value_offset) == pytest.approx(0.7)
    assert token_confidence([("nothing", -0.1)], content, verdict.value_offset) is None


def test_logprob_mode_config_rules_and_identity():
    rubric = load_rubric("default_v1")
    with pytest.raises(JudgeConfigError, match="task_kinds must be among pairwise, binary"):
        LLMJudgeConfig(model="m", rubric=rubric, verdict="logprobs")
    with pytest.raises(JudgeConfigError, match="needs logprobs = true"):
        LLMJudgeConfig(model="m", rubric=rubric, verdict="logprobs", logprobs=False,
                       task_kinds=("pairwise",))
    generate = LLMJudgeConfig(model="m", rubric=rubric)
    by_logprobs = LLMJudgeConfig(model="m", rubric=rubric, verdict="logprobs",
                                 task_kinds=("pairwise",))
    assert "verdict" not in generate.identity()
    assert by_logprobs.identity()["verdict"] == "logprobs"


@pytest.mark.slow
def test_a_logprob_judge_labels_every_task_through_prefloops_own_v1(sqlite_db, serve):
    """The bundled SmolLM2-135M behind prefloop's own /v1: as a JSON judge it gives no valid
    verdict (the demo's old 0 of 6); read by log-probabilities it labels every task, with a
    confidence, asking for a few tokens per call."""
    from sqlmodel import select

    from feedback.batch import BatchRunner
    from store.models import Label
    from tests.feedback.conftest import make_tasks

    served = deploy_and_serve(serve, sqlite_db, "v1", "smollm2-135m-instruct",
                              serving_smoke_timeout_s=300.0)
    ids = make_tasks(sqlite_db, [("ok", "pairwise", [9, 1]), ("ok", "pairwise", [1, 9]),
                                 ("ok", "binary", [9])])
    config = LLMJudgeConfig(model="v1", rubric=load_rubric("default_v1"),
                            base_url=f"{served.url}/v1", verdict="logprobs",
                            task_kinds=("pairwise", "binary"))
    stats = asyncio.run(BatchRunner(sqlite_db, config, api_key=served.token).run())
    assert (stats.written, stats.valid, stats.invalid, stats.failed) == (3, 3, 0, 0)
    assert stats.requests == 2 + 2 + 1 and stats.completion_tokens <= 5 * LABEL_MAX_TOKENS
    with sqlite_db.read() as session:
        labels = {label.task_id: label for label in session.exec(select(Label)).all()}
    for task_id, kind in zip(ids, ("pairwise", "pairwise", "binary"), strict=True):
        label = labels[task_id]
        assert 0.5 <= label.confidence <= 1.0 and label.details["mode"] == "logprobs"
        if kind == "pairwise":
            p_a = label.details["p_a"]
            assert label.confidence == pytest.approx(max(p_a, 1 - p_a))
            assert label.choice == ("a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie")
        else:
            assert label.choice in ("up", "down")
