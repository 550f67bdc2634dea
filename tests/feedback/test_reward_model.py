"""Reward-model judge: pure decisions on hand values; scores equal training's reward function."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from sqlmodel import select

from feedback.batch import BatchRunner
from feedback.config import RewardModelJudgeConfig
from feedback.reward_model import decide_from_rewards
from store.db import Database
from store.models import Label
from tests.feedback.conftest import make_tasks


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_decide_from_rewards_hand_computed() -> None:
    d = decide_from_rewards("pairwise", [1.0, -1.0])
    assert d.value == {"choice": "a"} and d.confidence == pytest.approx(_sig(2.0))
    assert decide_from_rewards("pairwise", [0.5, 0.7], tie_margin=0.25).value == {
        "choice": "tie"}
    assert decide_from_rewards("pairwise", [0.5, 0.7]).value == {"choice": "b"}
    assert decide_from_rewards("binary", [0.2], binary_threshold=0.5).value == {
        "choice": "down"}
    d = decide_from_rewards("listwise", [0.0, 2.0, 1.0])
    assert d.value == {"ranks": [3, 1, 2], "ratings": [0.0, 2.0, 1.0]}
    assert d.confidence == pytest.approx((_sig(2) + _sig(1) + _sig(1)) / 3)
    assert decide_from_rewards("pairwise", [math.nan, 1.0]).value is None


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from training.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id or 0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_scores_match_training_sequence_rewards(tiny_rm: Path) -> None:
    import torch

    from feedback.reward_model import RewardScorer
    from training.logprobs import sequence_rewards

    scorer = RewardScorer(str(tiny_rm))
    rewards = scorer.score("What is 2+2? ", ["4", "five, I think"])
    for response, reward in zip(["4", "five, I think"], rewards, strict=True):
        ids = torch.tensor([scorer.encode("What is 2+2? ", response)])
        with torch.no_grad():
            expected = sequence_rewards(scorer.model, ids, torch.ones_like(ids))
        assert reward == pytest.approx(float(expected[0]), abs=1e-5)
    assert rewards[0] != rewards[1]


def test_reward_model_judge_writes_labels(sqlite_db: Database, tiny_rm: Path) -> None:
    from feedback.reward_model import RewardScorer

    ids = make_tasks(sqlite_db, [("ok", "pairwise", [1, 2]), ("ok", "listwise", [1, 2, 3]),
                                 ("ok", "binary", [5])])
    config = RewardModelJudgeConfig(name="tiny", model_path=str(tiny_rm))
    stats = asyncio.run(BatchRunner(sqlite_db, config).run())
    assert stats.written == 3 and stats.invalid == 0
    with sqlite_db.read() as session:
        labels = {lb.task_id: lb for lb in session.exec(select(Label))}
    scorer = RewardScorer(str(tiny_rm))
    expected = decide_from_rewards("pairwise", scorer.score(
        "Question 0 [mode=ok]", ["answer 0.0 quality=1", "answer 0.1 quality=2"]))
    assert labels[ids[0]].choice == expected.value["choice"]  # type: ignore[index]
    assert labels[ids[0]].confidence == pytest.approx(expected.confidence)
    listwise = decide_from_rewards("listwise", scorer.score(
        "Question 1 [mode=ok]", [f"answer 1.{j} quality={j + 1}" for j in range(3)]))
    assert labels[ids[1]].ranks == listwise.value["ranks"]  # type: ignore[index]
    assert labels[ids[2]].choice in ("up", "down")
