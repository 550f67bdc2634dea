"""Stage 3, label: the AI and rule judges label the round's tasks, then the stage waits for the
human quota (if any) until its deadline.

The judges store one label per (task, judge) (a database constraint) as they go, so a rerun only
fills what is missing; the stage's own transaction is the advance with the label counts.

    prefloop round run --set label.human_quota=20 --set label.human_deadline_s=3600
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from loop.config import RoundConfig
from loop.stages.common import StageContext, StageResult
from loop.stages.judging import judge_configs, run_judges
from store import rounds as store_rounds
from store.models import Round


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """AI and rule judges label the round's tasks; then wait for the human quota, if any."""
    assert rnd.id is not None
    round_id = rnd.id
    source = f"round:{round_id}"
    label = config.label
    if "label_started_at" not in (rnd.metrics or {}).get("label_progress", {}):
        # Recorded once, so the human deadline counts from the first attempt, not the resume.
        with ctx.db.write() as session:
            store_rounds.record_progress(session, round_id=rnd.id, expected="label",
                                         outputs={"label_progress": {
                                             "label_started_at": time.time()}})
        rnd = ctx.load(rnd.id)
    started_at = float((rnd.metrics or {})["label_progress"]["label_started_at"])
    judges = judge_configs(ctx, label.judges)
    stats = run_judges(ctx, judges, round_id, source, label.ai_task_limit)
    waited = "none"
    while label.human_quota:
        with ctx.db.read() as session:
            counts = store_rounds.labels_by_source(
                session, store_rounds.round_task_ids(session, round_id, source))
        if counts["human"] >= label.human_quota:
            waited = "quota"
            break
        if label.human_deadline_s and time.time() - started_at >= label.human_deadline_s:
            waited = "deadline"
            break
        time.sleep(label.poll_s)
    with ctx.db.read() as session:
        task_ids = store_rounds.round_task_ids(session, round_id, source)
        counts = store_rounds.labels_by_source(session, task_ids)
    outputs: dict[str, Any] = {"judges": stats, "labels": counts, "human_wait": waited}
    if label.calibrate_against:
        outputs.update(calibrate_and_route(ctx, config, judges, task_ids))
    return StageResult(outputs)


def calibrate_and_route(ctx: StageContext, config: RoundConfig, judges: Sequence[Any],
                        task_ids: list[int]) -> dict[str, object]:
    """Calibrate each LLM judge against the reference judge (all the tasks both labelled), then
    route this round's uncertain or disputed tasks to humans. Both are idempotent, so a resumed
    stage repeats them harmlessly."""
    from feedback.calibrate import calibrate, route_tasks
    from store.errors import NotFound

    label = config.label
    reference = label.calibrate_against
    assert reference is not None
    calibration: dict[str, object] = {}
    routing: dict[str, int] = {}
    llm_judges = [j for j in judges if j.kind == "llm"]
    for judge in llm_judges:
        try:
            result = calibrate(ctx.db, judge, against=reference)
        except NotFound:  # the judge (or the reference) wrote no label this round
            continue
        keys = ("agreement", "agreement_decisive", "n_compared", "n_decisive", "cohen_kappa")
        calibration[judge.annotator_name] = {"reference": reference, "n_tasks": result.n_tasks,
                                             **{k: result.metrics.get(k) for k in keys}}
    if calibration:
        routing = route_tasks(ctx.db, [j for j in llm_judges
                                       if j.annotator_name in calibration],
                              min_confidence=label.route_min_confidence,
                              priority=label.route_priority, task_ids=task_ids,
                              extra_annotators=[reference])
    return {"calibration": calibration, "routing": routing}
