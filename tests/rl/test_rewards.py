"""Reward sources: rule checks on tagged answers, a reward-model folder, weighted mixes; the
seeded arithmetic task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from training.rewards import (
    RewardModelScorer,
    RewardSpecError,
    make_reward,
    parse_reward_spec,
    rule_reward,
)
from training.tasks import make_arithmetic_prompts

TEXTS = [
    "3 plus 4 is 7. <answer>7</answer>",       # format ok, right
    "It is 8. <answer>8</answer>",             # format ok, wrong
    "The answer is 7.",                        # no tag
    "<answer>7</answer> and then more words",  # tag not at the end
    "<answer>7</answer><answer>8</answer>",    # two tags
]


def test_rule_rewards_score_format_and_accuracy() -> None:
    answers = ["7"] * len(TEXTS)
    assert rule_reward("format")([""] * 5, TEXTS, answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rule_reward("accuracy")([""] * 5, TEXTS, answers) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert rule_reward("format+accuracy")([""] * 5, TEXTS, answers) == [1.0, 0.5, 0.0, 0.5, 0.5]
    # Without a reference, accuracy does not apply: only the format counts.
    assert rule_reward("format+accuracy")([""] * 2, TEXTS[:2], [None, None]) == [1.0, 1.0]
    assert rule_reward("r1-format")([""], ["<think>x</think><answer>7</answer>"], ["7"]) == [1.0]
    with pytest.raises(RewardSpecError, match="unknown rule"):
        rule_reward("format+vibes")


def test_reward_specs_parse_weights_and_reject_bad_terms() -> None:
    assert parse_reward_spec("rule:format+accuracy*0.5, rm:runs/rm*2") == [
        ("rule", "format+accuracy", 0.5), ("rm", "runs/rm", 2.0)]
    assert parse_reward_spec("rule:format") == [("rule", "format", 1.0)]
    for bad in ("", "format", "judge:x", "rm:"):
        with pytest.raises(RewardSpecError):
            parse_reward_spec(bad)
    with pytest.raises(RewardSpecError, match="no model folder"):
        make_reward("rm:/nonexistent/rm")


@pytest.fixture(scope="module")
def reward_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_policy_dir: Path,
                   rl_tokenizer: Any) -> Path:
    """A `prefloop train rm`-shaped run folder: RUN/model/ holds a scalar-head model."""
    from training.models import load_reward_backbone

    run = tmp_path_factory.mktemp("rm-run")
    torch.manual_seed(0)
    model = load_reward_backbone(str(tiny_policy_dir), rl_tokenizer.pad_token_id)
    model.save_pretrained(run / "model")
    rl_tokenizer.save_pretrained(run / "model")
    return run


def test_reward_model_scores_equal_a_direct_forward(reward_run_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    prompts: list[Any] = [[{"role": "user", "content": "What is 3 + 4?"}], "Q: colour?\nA:"]
    texts = ["It is 7. <answer>7</answer>", " Blue, a calm and very long colour name"]
    scorer = RewardModelScorer.load(str(reward_run_dir), batch_size=2)
    scores = scorer(prompts, texts, [None, None])
    model = AutoModelForSequenceClassification.from_pretrained(reward_run_dir / "model")
    # Without a pad id (and batch 1) transformers reads the head at the very last token; with
    # pad = EOS it would stop at the first EOS of the chat template instead.
    model.config.pad_token_id = None
    for prompt, text, score in zip(prompts, texts, scores, strict=True):
        ids = torch.tensor([scorer.encode(prompt, text)])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert scorer.encode(prompts[1], texts[1])[-1] == scorer.tokenizer.eos_token_id


def test_weighted_mix_is_the_weighted_sum(reward_run_dir: Path) -> None:
    prompts: list[Any] = ["Q:"] * 2
    texts = TEXTS[:2]
    answers = ["7", "7"]
    mixed = make_reward(f"rule:format+accuracy*0.5,rm:{reward_run_dir}*2")(prompts, texts,
                                                                            answers)
    rule = rule_reward("format+accuracy")(prompts, texts, answers)
    rm = make_reward(f"rm:{reward_run_dir}")(prompts, texts, answers)
    assert mixed == pytest.approx([0.5 * a + 2 * b for a, b in zip(rule, rm, strict=True)],
                                  abs=1e-5)


def test_arithmetic_prompts_are_seeded_disjoint_and_correct() -> None:
    train = make_arithmetic_prompts(40, seed=0, split="train")
    test = make_arithmetic_prompts(20, seed=0, split="test")
    assert train == make_arithmetic_prompts(40, seed=0, split="train")
    assert train != make_arithmetic_prompts(40, seed=1, split="train")
    assert len({r["id"] for r in train}) == 40
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    for row in train + test:
        question = row["prompt"][-1]["content"]
        a, op, b = question.removeprefix("What is ").rstrip("?").split()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert row["prompt"][2]["content"].endswith("<answer>7</answer>")  # the example turn
    with pytest.raises(ValueError, match="split"):
        make_arithmetic_prompts(1, 0, "valid")
