"""The judges of a round (label and evaluate stages): their configs, the endpoint LLM judges
talk to, and one pass of every judge over a round's tasks (feedback/batch.py does the labeling).

    python -c "from loop.stages.judging import JudgeEndpoint; print(JudgeEndpoint('http://x/v1'))"
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loop.stages.common import StageContext
from store import rounds as store_rounds

DEPLOYED_MODEL = "@deployed"


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the LLM judges of a run send their requests (overrides their config files)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    """None keeps each config's model; DEPLOYED_MODEL asks for the version deployed when the
    judge runs, named after it, so each policy version judges under its own identity."""


def judge_configs(ctx: StageContext, paths: Sequence[str]) -> list[Any]:
    """The judge configs at `paths`, LLM judges pointed at the runner's endpoint if it has one."""
    from feedback.config import LLMJudgeConfig, load_judge_config
    from store import deployments

    configs = []
    endpoint = ctx.judge_endpoint
    model = endpoint.model if endpoint is not None else None
    if model == DEPLOYED_MODEL:
        with ctx.db.read() as session:
            current = deployments.deployed(session)
        model = current.name if current is not None else None
    for path in paths:
        judge = load_judge_config(path)
        if isinstance(judge, LLMJudgeConfig) and endpoint is not None:
            judge = dataclasses.replace(judge, base_url=endpoint.base_url,
                                        model=model or judge.model)
        configs.append(judge)
    return configs


def run_judges(ctx: StageContext, judges: Sequence[Any], round_id: int, source: str,
               ai_limit: int) -> dict[str, Any]:
    """Each judge over the tasks of `source` it has not labelled; an LLM judge stops at
    `ai_limit` labels in all (counting earlier attempts), so a resume never exceeds it."""
    from feedback.batch import run_judge
    from feedback.progress import RichProgress
    from feedback.tasks import TaskFilter, ensure_annotator

    stats: dict[str, Any] = {}
    api_key = ctx.judge_endpoint.api_key if ctx.judge_endpoint else None
    for judge in judges:
        limit = None
        if judge.kind == "llm" and ai_limit:
            with ctx.db.write() as session:
                annotator = ensure_annotator(session, judge)
            with ctx.db.read() as session:
                task_ids = store_rounds.round_task_ids(session, round_id, source)
                done = store_rounds.annotator_label_count(session, annotator.id or 0, task_ids)
            limit = max(0, ai_limit - done)
            if limit == 0:
                stats[judge.annotator_name] = {"written": 0, "skipped": "limit reached"}
                continue
        task_filter = TaskFilter(round_id=round_id, source=source, limit=limit)
        kwargs: dict[str, Any] = {"task_filter": task_filter,
                                  "progress": RichProgress() if ctx.progress else None}
        if judge.kind == "llm":
            kwargs["api_key"] = api_key
        run = asyncio.run(run_judge(ctx.db, judge, **kwargs))
        stats[judge.annotator_name] = {
            "written": run.written, "valid": run.valid, "invalid": run.invalid,
            "failed": run.failed, "requests": run.requests,
            "elapsed_s": round(run.elapsed_s, 3)}
    return stats
