"""Stage 4, build_dataset: the round's labels exported with the round's filters, through the
same writer as `prefloop export` (store/exporting.py: one file format, one manifest format), plus
the round's prompts for the online algorithms.

The files are written first (each by rename), the snapshot row with the advance: a kill in
between leaves files that the rerun rewrites with the same rows, and no snapshot row.

    prefloop export --format trl-preference --round 1 --source rule --out round-1.jsonl
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from loop.config import RoundConfig
from loop.stages.common import StageContext, StageResult
from store.exporting import (
    ExportFilters,
    export_prompts,
    record_snapshot,
    render_export,
    write_export,
)
from store.models import Round


def run(ctx: StageContext, rnd: Round, config: RoundConfig) -> StageResult:
    """Export the round's labels with its filters; record the manifest and snapshot."""
    assert rnd.id is not None
    run_dir = ctx.run_dir(rnd)
    ds = config.dataset
    export_format: Any = "trl-unpaired" if config.algo == "kto" else "trl-preference"
    filters = ExportFilters(
        sources=ds.sources, min_agreement=ds.min_agreement, round_id=rnd.id,
        split=config.task.train_split, pairs_as_unpaired=config.algo == "kto",
        min_judge_agreement=ds.min_judge_agreement,
        weight_ai_by_agreement=ds.weight_ai_by_agreement)
    export = render_export(ctx.db, export_format, filters)
    prompts = ctx.prompts((rnd.metrics or {})["collect"]["train_prompt_ids"])
    out = run_dir / "dataset.jsonl"
    write_export(export, out, database=ctx.db.url, snapshot_id=None)
    prompts_path = run_dir / "prompts.jsonl"
    prompts_sha256 = export_prompts(prompts_path, prompts)

    def write(session: Session) -> dict[str, Any]:
        return {"snapshot_id": record_snapshot(session, export, out).id}

    return StageResult({"path": str(out), "sha256": export.sha256, "rows": export.rows,
                        "format": export_format, "counts": export.counts,
                        "prompts_path": str(prompts_path),
                        "prompts_sha256": prompts_sha256}, write)
