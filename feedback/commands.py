"""`prefloop judge ...`: run AI/rule judges over the store, calibrate them, route to humans.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise --concurrency 16
    prefloop judge calibrate --judge judges/pairwise.toml
    prefloop judge route --judge judges/a.toml --judge judges/b.toml
    prefloop judge list
    prefloop judge rubrics

Registered by cli.py (`register(root)`); every command parses flags, builds a config and calls
one function of feedback/. The store comes from the context cli.py puts on typer's root context
(store.command_context), never from a global. Heavy imports (openai) happen inside the commands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from store.command_context import command_context, fail

judge_app = typer.Typer(help="AI and rule judges: batch labeling, calibration, routing.",
                        no_args_is_help=True)


def _load(path: Path, overrides: Sequence[str] = ()) -> Any:
    from feedback.config import load_judge_config
    from training.config_reader import ConfigError

    try:  # a RubricError is a ConfigError too
        return load_judge_config(path, overrides=overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@judge_app.command("run")
def run_command(
    ctx: typer.Context,
    judge: Annotated[Path, typer.Option("--judge", help="Judge config (.toml or .json).")],
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Filter: key=value,... with kind, dataset, split, round, source, "
        "ids=a-b, limit, gold=1, human=1.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    max_requests: Annotated[int | None, typer.Option(
        help="Stop after this many HTTP requests (retries included).")] = None,
    budget_usd: Annotated[float | None, typer.Option(
        help="Stop starting tasks once this much was spent (needs prices in the config).")
    ] = None,
    base_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible endpoint (overrides the config).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (overrides the config).")] = None,
    rate: Annotated[float | None, typer.Option(
        help="Most request starts per second (overrides limits.rate_limit_rps).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: key=value or section.key=value (repeatable), "
        "e.g. limits.write_batch=20.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run's stats as JSON.")
                        ] = False,
) -> None:
    """Label the tasks this judge has not labelled yet (a rerun only fills what is missing)."""
    import asyncio

    from feedback.batch import run_judge
    from feedback.llm import EndpointUnusable
    from feedback.progress import RichProgress
    from feedback.tasks import TaskFilter
    from store.errors import StoreError
    from training.config_reader import ConfigError

    if concurrency is not None and concurrency < 1:
        raise fail("--concurrency must be at least 1")
    # The flags are overrides in the one `--set` grammar; the explicit --set items come first,
    # so a flag wins over them as it wins over the file.
    overrides = [*(set_ or []),
                 *([f"base_url={base_url}"] if base_url is not None else []),
                 *([f"model={model}"] if model is not None else []),
                 *([f"limits.rate_limit_rps={rate}"] if rate is not None else [])]
    config = _load(judge, overrides)
    if config.kind != "llm" and (base_url or model):
        raise fail("--base-url/--model only apply to llm judges")
    try:
        task_filter = TaskFilter.parse(tasks)
        db = command_context(ctx).open_database()
        stats = asyncio.run(run_judge(
            db, config, task_filter=task_filter, concurrency=concurrency,
            max_requests=max_requests, budget_usd=budget_usd,
            progress=RichProgress() if progress and not json_out else None))
    except EndpointUnusable as exc:
        raise fail(f"the endpoint refuses the judge's requests: {exc}", 1) from None
    except (ConfigError, StoreError) as exc:
        raise fail(str(exc)) from None
    if json_out:
        typer.echo(json.dumps(stats.as_dict(), indent=2, default=str))
        return
    typer.echo(
        f"{stats.annotator_name}: {stats.written} labels written of {stats.tasks_pending} "
        f"pending ({stats.valid} valid, {stats.invalid} invalid, {stats.inconsistent} "
        f"position-inconsistent, {stats.flagged} flagged, {stats.routed} routed to humans); "
        f"{stats.requests} requests, {stats.retries} retries, ${stats.spend_usd:.4f}, "
        f"{stats.elapsed_s:.1f} s"
        + (f"; stopped early: {stats.stopped}" if stats.stopped else "")
        + (f"; {stats.failed} tasks gave up (a rerun retries them)" if stats.failed else ""))
    if stats.invalid_reasons:
        typer.echo("invalid: " + ", ".join(f"{k}={v}" for k, v in
                                           stats.invalid_reasons.most_common()))


@judge_app.command("calibrate")
def calibrate_command(
    ctx: typer.Context,
    judge: Annotated[Path, typer.Option("--judge", help="Judge config (.toml or .json).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    against: Annotated[str | None, typer.Option(
        "--against", help="Calibrate against this judge's labels (its annotator name, e.g. "
        "rule:arith-format-accuracy@1) on the tasks both labelled, instead of gold and human "
        "labels.")] = None,
) -> None:
    """Measure the judge against gold and human labels (or another judge's); store the result
    for routing/export."""
    from rich.console import Console
    from rich.table import Table

    from feedback.calibrate import calibrate
    from store.errors import StoreError

    config = _load(judge)
    try:
        result = calibrate(command_context(ctx).open_database(), config, against=against)
    except StoreError as exc:
        raise fail(str(exc)) from None
    if json_out:
        typer.echo(json.dumps({"judge": result.annotator_name, "n_tasks": result.n_tasks,
                               "metrics": result.metrics}, indent=2))
        return
    reference = f"labels of {against}" if against else "gold or human labels"
    table = Table("metric", "value",
                  title=f"{result.annotator_name}: {result.n_tasks} tasks with {reference}")
    for key, value in result.metrics.items():
        if key != "by_kind":
            table.add_row(key, _fmt(value))
    for kind, values in result.metrics["by_kind"].items():
        table.add_row(f"{kind}: agreement / kappa / n",
                      f"{_fmt(values['agreement'])} / {_fmt(values['cohen_kappa'])} / "
                      f"{values['n_compared']}")
    Console().print(table)


@judge_app.command("route")
def route_command(
    ctx: typer.Context,
    judge: Annotated[list[Path], typer.Option("--judge", help="Judge config (repeatable).")],
    min_confidence: Annotated[float, typer.Option(
        help="Route labels whose (calibrated) confidence is below this.")] = 0.6,
    priority: Annotated[int, typer.Option(help="Priority routed tasks are raised to.")] = 10,
) -> None:
    """Send tasks where judges disagree or are unsure to the front of the human queue."""
    from feedback.calibrate import route_tasks
    from store.errors import StoreError

    configs = [_load(path) for path in judge]
    try:
        counts = route_tasks(command_context(ctx).open_database(), configs,
                             min_confidence=min_confidence, priority=priority)
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(", ".join(f"{k}={v}" for k, v in counts.items()))


@judge_app.command("list")
def list_command(ctx: typer.Context) -> None:
    """Judges in the store with their label counts and newest calibration."""
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import func
    from sqlmodel import col, select

    from store.calibration import latest_calibration
    from store.models import Annotator, AnnotatorKind, Label

    db = command_context(ctx).open_database()
    table = Table(title="judges")
    table.add_column("judge", no_wrap=True)
    for column in ("kind", "valid", "invalid", "agreement", "kappa", "consistency",
                   "calibrated on"):
        table.add_column(column)
    with db.read() as session:
        judges = session.exec(select(Annotator).where(
            col(Annotator.kind).in_([AnnotatorKind.ai, AnnotatorKind.rule]))
            .order_by(col(Annotator.name))).all()
        for judge in judges:
            counts = dict(session.exec(
                select(Label.status, func.count()).where(Label.annotator_id == judge.id)
                .group_by(Label.status)).all())
            cal = latest_calibration(session=session, annotator_id=judge.id or 0)
            metrics = cal.metrics if cal else {}
            table.add_row(judge.name, judge.kind.value, str(counts.get("submitted", 0)),
                          str(counts.get("invalid", 0)), _fmt(metrics.get("agreement")),
                          _fmt(metrics.get("cohen_kappa")),
                          _fmt(metrics.get("position_consistency")),
                          f"{cal.n_tasks} tasks" if cal else "-")
    Console().print(table)


@judge_app.command("rubrics")
def rubrics_command() -> None:
    """The builtin rubrics (name, version, task kinds)."""
    from feedback.rubric import builtin_rubrics

    for ref, rubric in builtin_rubrics().items():
        typer.echo(f"{ref}: {rubric.name}@{rubric.version} "
                   f"({', '.join(rubric.templates)}) sha256 {rubric.sha256[:12]}")


def register(root: typer.Typer) -> None:
    """Add `prefloop judge ...` to the root app (called by cli.py)."""
    root.add_typer(judge_app, name="judge")
