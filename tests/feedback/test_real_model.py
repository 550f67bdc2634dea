"""End to end against a real local model: SmolLM2-135M-Instruct behind an OpenAI-compatible
HTTP endpoint (tests/feedback/smollm_server.py), judged through the `openai` client.

Slow (a 135M model on CPU takes seconds per call). A model this small is not a good judge, so
the test asserts the pipeline, not the verdicts: every task ends labelled or invalid exactly
once, raw per-order outputs and logprob confidences are stored, and a rerun sends nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlmodel import select

from feedback.batch import BatchRunner
from feedback.calibrate import calibrate
from feedback.config import LLMJudgeConfig, RunLimits
from feedback.rubric import load_rubric
from store import repo
from store.db import Database
from store.models import AnnotatorKind, Label, LabelStatus, TaskKind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm() -> Iterator[object]:
    pytest.importorskip("transformers")
    from tests.feedback.smollm_server import SmolLMServer

    server = SmolLMServer().start()
    yield server
    server.stop()


def test_judge_runs_end_to_end_against_smollm2(sqlite_db: Database, smollm) -> None:
    tasks = [
        (TaskKind.pairwise, "What is the capital of France?",
         ["The capital of France is Paris.", "The capital of France is Lyon."]),
        (TaskKind.pairwise, "What is 2 + 2?", ["5", "2 + 2 = 4."]),
        (TaskKind.binary, "Name a primary colour.", ["Red is a primary colour."]),
        (TaskKind.listwise, "Which is a fruit?", ["An apple.", "A chair.", "A car."]),
    ]
    ids = []
    with sqlite_db.write() as session:
        for kind, question, answers in tasks:
            p = repo.get_or_create_prompt(session=session, content=question)
            cids = [repo.get_or_create_completion(session=session, prompt_id=p.id, content=a,
                                                  origin="external:t").id for a in answers]
            task, _ = repo.get_or_create_task(session=session, kind=kind, prompt_id=p.id,
                                              completion_ids=cids)
            ids.append(task.id)
        human = repo.get_or_create_annotator(session=session, name="h", kind=AnnotatorKind.human)
        repo.submit_label(session=session, task_id=ids[0], annotator_id=human.id,
                          value={"choice": "a"})
    config = LLMJudgeConfig(
        model="smollm2", rubric=load_rubric("default_v1"), base_url=smollm.url,
        listwise_shuffles=2, max_tokens=48,
        limits=RunLimits(concurrency=2, rate_limit_rps=5, timeout_s=300, max_retries=2))
    stats = asyncio.run(BatchRunner(sqlite_db, config).run())

    with sqlite_db.read() as session:
        labels = {lb.task_id: lb for lb in session.exec(select(Label))
                  if lb.annotator_id != human.id}
    assert sorted(labels) == sorted(ids)
    assert stats.written == 4 and stats.valid + stats.invalid == 4 and stats.failed == 0
    n_calls = 2 + 2 + 1 + 2
    assert smollm.requests == n_calls == stats.requests - stats.errors["fallback"]
    for task_id, label in labels.items():
        orders = label.details["orders"]
        assert len(orders) == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 2}[task_id]
        if label.status == LabelStatus.submitted:
            assert all(o["valid"] for o in orders)
            assert label.confidence is not None and 0.0 <= label.confidence <= 1.0
        else:
            assert label.choice is None and label.ranks is None
    # Rerun: nothing pending, no request sent.
    again = asyncio.run(BatchRunner(sqlite_db, config).run())
    assert (again.tasks_pending, again.requests) == (0, 0)
    assert smollm.requests == n_calls
    result = calibrate(sqlite_db, config)
    assert result.n_tasks == 1 and result.metrics["n_judged"] == 4
