"""`prefloop judge ...`: run AI/rule judges over the store, calibrate them, route to humans.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise --concurrency 16
    prefloop judge calibrate --judge judges/pairwise.toml
    prefloop judge route --judge judges/a.toml --judge judges/b.toml
    prefloop judge list
    prefloop judge rubrics
    prefloop round run --algo dpo [--config FILE] [--set section.key=value] [--ray-address ADDR]
    prefloop round resume | status [ID] | list | cancel ID
    prefloop demo --rounds 3

Registered by cli.py (`register(root)`); every command parses flags, builds a config and calls
one function of feedback/. Heavy imports (openai) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

judge_app = typer.Typer(help="AI and rule judges: batch labeling, calibration, routing.",
                        no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _load(path: Path, overrides: dict[str, Any] | None = None) -> Any:
    from feedback.config import ConfigError, load_judge_config
    from feedback.rubric import RubricError

    try:
        return load_judge_config(path, overrides=overrides)
    except (ConfigError, RubricError) as exc:
        raise _fail(str(exc)) from None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


@judge_app.command("run")
def run_command(
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
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run's stats as JSON.")
                        ] = False,
) -> None:
    """Label the tasks this judge has not labelled yet (a rerun only fills what is missing)."""
    import asyncio

    from feedback.batch import RichProgress, TaskFilter, run_judge
    from feedback.config import ConfigError
    from feedback.llm import EndpointUnusable
    from store.errors import StoreError

    if concurrency is not None and concurrency < 1:
        raise _fail("--concurrency must be at least 1")
    overrides: dict[str, Any] = {"base_url": base_url, "model": model,
                                 "limits.rate_limit_rps": rate}
    config = _load(judge, overrides)
    if config.kind != "llm" and (base_url or model):
        raise _fail("--base-url/--model only apply to llm judges")
    try:
        task_filter = TaskFilter.parse(tasks)
        from cli import open_database

        db = open_database()
        stats = asyncio.run(run_judge(
            db, config, task_filter=task_filter, concurrency=concurrency,
            max_requests=max_requests, budget_usd=budget_usd,
            progress=RichProgress() if progress and not json_out else None))
    except EndpointUnusable as exc:
        raise _fail(f"the endpoint refuses the judge's requests: {exc}", 1) from None
    except (ConfigError, StoreError) as exc:
        raise _fail(str(exc)) from None
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
    judge: Annotated[Path, typer.Option("--judge", help="Judge config (.toml or .json).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Measure the judge against gold and human labels; store the result for routing/export."""
    from rich.console import Console
    from rich.table import Table

    from feedback.calibrate import calibrate
    from store.errors import StoreError

    config = _load(judge)
    try:
        from cli import open_database

        result = calibrate(open_database(), config)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    if json_out:
        typer.echo(json.dumps({"judge": result.annotator_name, "n_tasks": result.n_tasks,
                               "metrics": result.metrics}, indent=2))
        return
    table = Table("metric", "value", title=f"{result.annotator_name}: {result.n_tasks} tasks "
                  "with gold or human labels")
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
        from cli import open_database

        counts = route_tasks(open_database(), configs, min_confidence=min_confidence,
                             priority=priority)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(", ".join(f"{k}={v}" for k, v in counts.items()))


@judge_app.command("list")
def list_command() -> None:
    """Judges in the store with their label counts and newest calibration."""
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import func
    from sqlmodel import col, select

    from cli import open_database
    from store.calibration import latest_calibration
    from store.models import Annotator, AnnotatorKind, Label

    db = open_database()
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


# ---------------------------------------------------------------------------------------------
# Rounds (feedback/rounds.py) and the demo (feedback/demo.py)

round_app = typer.Typer(help="Training rounds: collect -> generate -> label -> build dataset -> "
                        "train -> evaluate -> promote/reject.", no_args_is_help=True)


def _runs_dir(runs_dir: Path | None) -> Path:
    import os

    return runs_dir or Path(os.environ.get("PREFLOOP_RUNS_DIR", "runs"))


def _round_config(config: Path | None, algo: str | None, overrides: list[str] | None,
                  ray_address: str | None, no_ray: bool) -> Any:
    from feedback.rounds import RoundConfigError, load_round_config

    items = list(overrides or [])
    if ray_address:
        items.append(f"ray_address={json.dumps(ray_address)}")
    if no_ray:
        items.append("use_ray=false")
    try:
        return load_round_config(config, algo=algo, overrides=items)
    except (RoundConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/]", highlight=False)


def _print_summary(rnd: Any) -> None:
    from feedback.demo import print_rows, round_row
    from feedback.rounds import RoundSummary

    print_rows([round_row(RoundSummary.of(rnd))], f"round {rnd.id}")


_CONFIG_OPT = typer.Option("--config", help="Round config TOML (default "
                           "feedback/configs/round.toml).")
_SET_OPT = typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
_RAY_OPT = typer.Option("--ray-address", help="Run the stages on this Ray cluster "
                        "(default: local Ray).")
_NO_RAY_OPT = typer.Option("--no-ray", help="Run the stages in this process, without Ray.")
_RUNS_OPT = typer.Option("--runs-dir", help="Where rounds write their artefacts "
                         "(default $PREFLOOP_RUNS_DIR, else ./runs).")


@round_app.command("run")
def round_run(
    algo: Annotated[str | None, typer.Option(help="dpo | kto | ppo | grpo | rs (default: the "
                                             "config's)")] = None,
    config: Annotated[Path | None, _CONFIG_OPT] = None,
    set_: Annotated[list[str] | None, _SET_OPT] = None,
    ray_address: Annotated[str | None, _RAY_OPT] = None,
    no_ray: Annotated[bool, _NO_RAY_OPT] = False,
    runs_dir: Annotated[Path | None, _RUNS_OPT] = None,
) -> None:
    """Start a round and run it to promote/reject. Killed? `prefloop round resume`."""
    from feedback.rounds import RoundRunner
    from store.errors import StoreError

    round_config = _round_config(config, algo, set_, ray_address, no_ray)
    from cli import open_database

    db = open_database()
    runner = RoundRunner(db, runs_dir=_runs_dir(runs_dir), log=_log)
    try:
        round_id = runner.start(round_config, trigger="manual")
    except StoreError as exc:
        raise _fail(str(exc)) from None
    try:
        rnd = runner.run(round_id)
    except StoreError as exc:
        raise _fail(f"round {round_id}: {exc}", 1) from None
    _print_summary(rnd)


@round_app.command("resume")
def round_resume(runs_dir: Annotated[Path | None, _RUNS_OPT] = None) -> None:
    """Finish the unfinished round from the stage it stopped in (nothing is redone twice)."""
    from cli import open_database
    from feedback.rounds import RoundRunner
    from store.errors import StoreError

    runner = RoundRunner(open_database(), runs_dir=_runs_dir(runs_dir), log=_log)
    try:
        rnd = runner.resume()
    except StoreError as exc:
        raise _fail(str(exc), 1) from None
    if rnd is None:
        typer.echo("no unfinished round")
        return
    _print_summary(rnd)


@round_app.command("list")
def round_list(limit: Annotated[int, typer.Option(help="Most recent rounds shown.")] = 20
               ) -> None:
    """Rounds with their outcome, labels, win rate, reward, KL and wall time."""
    from cli import open_database
    from feedback.demo import print_rows, round_row
    from feedback.rounds import summaries

    rows = [round_row(s) for s in summaries(open_database(), limit=limit)]
    if not rows:
        typer.echo("no rounds yet")
        return
    print_rows(rows, "rounds")


@round_app.command("status")
def round_status(
    round_id: Annotated[int | None, typer.Argument(help="Round id (default: the latest).")
                        ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the round as JSON.")] = False,
) -> None:
    """One round's state, per-stage outputs and timings, and the round lock."""
    from cli import open_database
    from store import rounds as store_rounds
    from store.models import Round

    db = open_database()
    with db.read() as session:
        rnd = session.get(Round, round_id) if round_id is not None else next(
            iter(reversed(store_rounds.list_rounds(session, limit=1))), None)
        lock = store_rounds.lock_state(session)
    if rnd is None:
        raise _fail(f"no round {round_id}" if round_id is not None else "no rounds yet")
    data = {"id": rnd.id, "algo": rnd.algo, "state": rnd.state, "trigger": rnd.trigger,
            "run_dir": rnd.run_dir, "error": rnd.error, "created_at": rnd.created_at,
            "finished_at": rnd.finished_at, "metrics": rnd.metrics,
            "lock": {"holder": lock.holder, "round_id": lock.round_id,
                     "expires_at": lock.expires_at, "held": lock.held()}}
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(f"round {rnd.id} ({rnd.algo}, {rnd.trigger}): {rnd.state}"
               + (f"; last error: {rnd.error}" if rnd.error else ""))
    for stage, seconds in (rnd.metrics or {}).get("timings", {}).items():
        typer.echo(f"  {stage:<14} {seconds:8.1f} s")
    typer.echo(f"  artefacts: {rnd.run_dir}")
    if lock.held():
        typer.echo(f"  running: {lock.holder} (lease until {lock.expires_at})")


@round_app.command("cancel")
def round_cancel(
    round_id: Annotated[int, typer.Argument(help="The unfinished round to abandon.")],
    reason: Annotated[str, typer.Option(help="Why (kept with the round).")] = "cancelled",
) -> None:
    """Abandon an unfinished round (its rows stay, for the record)."""
    from cli import open_database
    from store import rounds as store_rounds
    from store.errors import StoreError

    db = open_database()
    try:
        db.run_write(lambda s: store_rounds.cancel_round(s, round_id=round_id, reason=reason))
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"round {round_id} cancelled")


def demo_command(
    rounds: Annotated[int, typer.Option(min=1, max=50, help="Rounds to run.")] = 3,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Round config (default feedback/configs/demo.toml).")] = None,
    set_: Annotated[list[str] | None, _SET_OPT] = None,
    ray_address: Annotated[str | None, _RAY_OPT] = None,
    no_ray: Annotated[bool, _NO_RAY_OPT] = False,
    ai_judge: Annotated[bool, typer.Option(help="Also label with the AI judge (the deployed "
                                           "policy over the app's /v1 endpoint).")] = True,
    runs_dir: Annotated[Path | None, _RUNS_OPT] = None,
) -> None:
    """The closed loop headless: N rounds of online DPO on the seeded arithmetic task with the
    bundled SmolLM2; a table per round and a plot (RUNS_DIR/demo.png)."""
    from feedback.demo import run_demo
    from feedback.rounds import CONFIG_DIR
    from store.errors import StoreError

    round_config = _round_config(config or CONFIG_DIR / "demo.toml", None, set_, ray_address,
                                 no_ray)
    from app.settings import get_settings
    from cli import STATE, open_database

    db = open_database()
    try:
        run_demo(db, round_config, rounds=rounds, runs_dir=_runs_dir(runs_dir),
                 settings=get_settings(db_url=STATE.db_url), ai_judge=ai_judge, log=_log)
    except StoreError as exc:
        raise _fail(str(exc), 1) from None


def register(root: typer.Typer) -> None:
    root.add_typer(judge_app, name="judge")
    root.add_typer(round_app, name="round")
    root.command("demo")(demo_command)
