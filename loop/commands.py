"""`prefloop round ...`, `prefloop demo` and `prefloop up`: the loop's commands.

    prefloop round run --algo dpo [--config FILE] [--set section.key=value] [--ray-address ADDR]
    prefloop round resume | status [ID] | list | cancel ID
    prefloop demo --rounds 3
    prefloop up --host 127.0.0.1 --port 8000 [--rounds-every S | --rounds-cron EXPR |
                                              --rounds-after-labels N]

Registered by cli.py (`register(root)`); every command takes the store and the settings from the
root context (store/command_context.py), parses flags, builds a config and calls one function of
loop/. `prefloop up` lives here because it composes the web service (app/, with the labeling UI
of labeling/) and the round scheduler. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from store.command_context import command_context, fail

if TYPE_CHECKING:
    from fastapi import FastAPI

round_app = typer.Typer(help="Training rounds: collect -> generate -> label -> build dataset -> "
                        "train -> evaluate -> promote/reject.", no_args_is_help=True)


def _runs_dir(runs_dir: Path | None) -> Path:
    import os

    return runs_dir or Path(os.environ.get("PREFLOOP_RUNS_DIR", "runs"))


def _round_config(config: Path | None, algo: str | None, overrides: list[str] | None,
                  ray_address: str | None, no_ray: bool) -> Any:
    from loop.config import load_round_config

    items = list(overrides or [])
    if ray_address:
        items.append(f"ray_address={json.dumps(ray_address)}")
    if no_ray:
        items.append("use_ray=false")
    try:
        return load_round_config(config, algo=algo, overrides=items)
    except ValueError as exc:  # RoundConfigError (a ConfigError) and the dataclasses' checks
        raise fail(str(exc)) from None


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/]", highlight=False)


def _print_summary(rnd: Any) -> None:
    from loop.demo import print_rows, round_row
    from store.rounds import RoundSummary

    print_rows([round_row(RoundSummary.of(rnd))], f"round {rnd.id}")


_CONFIG_OPT = typer.Option("--config", help="Round config TOML (default "
                           "loop/configs/round.toml).")
_SET_OPT = typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
_RAY_OPT = typer.Option("--ray-address", help="Run the stages on this Ray cluster "
                        "(default: local Ray).")
_NO_RAY_OPT = typer.Option("--no-ray", help="Run the stages in this process, without Ray.")
_RUNS_OPT = typer.Option("--runs-dir", help="Where rounds write their artefacts "
                         "(default $PREFLOOP_RUNS_DIR, else ./runs).")


@round_app.command("run")
def round_run(
    ctx: typer.Context,
    algo: Annotated[str | None, typer.Option(help="dpo | kto | ppo | grpo | rs (default: the "
                                             "config's)")] = None,
    config: Annotated[Path | None, _CONFIG_OPT] = None,
    set_: Annotated[list[str] | None, _SET_OPT] = None,
    ray_address: Annotated[str | None, _RAY_OPT] = None,
    no_ray: Annotated[bool, _NO_RAY_OPT] = False,
    runs_dir: Annotated[Path | None, _RUNS_OPT] = None,
) -> None:
    """Start a round and run it to promote/reject. Killed? `prefloop round resume`."""
    from loop.runner import RoundRunner
    from store.errors import StoreError

    round_config = _round_config(config, algo, set_, ray_address, no_ray)
    db = command_context(ctx).open_database()
    runner = RoundRunner(db, runs_dir=_runs_dir(runs_dir), log=_log)
    try:
        round_id = runner.start(round_config, trigger="manual")
    except StoreError as exc:
        raise fail(str(exc)) from None
    try:
        rnd = runner.run(round_id)
    except StoreError as exc:
        raise fail(f"round {round_id}: {exc}", 1) from None
    _print_summary(rnd)


@round_app.command("resume")
def round_resume(ctx: typer.Context, runs_dir: Annotated[Path | None, _RUNS_OPT] = None) -> None:
    """Finish the unfinished round from the stage it stopped in (nothing is redone twice)."""
    from loop.runner import RoundRunner
    from store.errors import StoreError

    runner = RoundRunner(command_context(ctx).open_database(), runs_dir=_runs_dir(runs_dir),
                         log=_log)
    try:
        rnd = runner.resume()
    except StoreError as exc:
        raise fail(str(exc), 1) from None
    if rnd is None:
        typer.echo("no unfinished round")
        return
    _print_summary(rnd)


@round_app.command("list")
def round_list(ctx: typer.Context,
               limit: Annotated[int, typer.Option(help="Most recent rounds shown.")] = 20
               ) -> None:
    """Rounds with their outcome, labels, win rate, reward, KL and wall time."""
    from loop.demo import print_rows, round_row
    from store.rounds import summaries

    rows = [round_row(s) for s in summaries(command_context(ctx).open_database(), limit=limit)]
    if not rows:
        typer.echo("no rounds yet")
        return
    print_rows(rows, "rounds")


@round_app.command("status")
def round_status(
    ctx: typer.Context,
    round_id: Annotated[int | None, typer.Argument(help="Round id (default: the latest).")
                        ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the round as JSON.")] = False,
) -> None:
    """One round's state, per-stage outputs and timings, and the round lock."""
    from store import rounds as store_rounds

    db = command_context(ctx).open_database()
    with db.read() as session:
        rnd = store_rounds.get_round(session, round_id) if round_id is not None else next(
            iter(reversed(store_rounds.list_rounds(session, limit=1))), None)
        lock = store_rounds.lock_state(session)
    if rnd is None:
        raise fail(f"no round {round_id}" if round_id is not None else "no rounds yet")
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
    ctx: typer.Context,
    round_id: Annotated[int, typer.Argument(help="The unfinished round to abandon.")],
    reason: Annotated[str, typer.Option(help="Why (kept with the round).")] = "cancelled",
) -> None:
    """Abandon an unfinished round (its rows stay, for the record)."""
    from store import rounds as store_rounds
    from store.errors import StoreError

    db = command_context(ctx).open_database()
    try:
        db.run_write(lambda s: store_rounds.cancel_round(s, round_id=round_id, reason=reason))
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"round {round_id} cancelled")


def demo_command(
    ctx: typer.Context,
    rounds: Annotated[int, typer.Option(min=1, max=50, help="Rounds to run.")] = 3,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Round config (default loop/configs/demo.toml).")] = None,
    set_: Annotated[list[str] | None, _SET_OPT] = None,
    ray_address: Annotated[str | None, _RAY_OPT] = None,
    no_ray: Annotated[bool, _NO_RAY_OPT] = False,
    ai_judge: Annotated[bool, typer.Option(help="Also label with the AI judge (the deployed "
                                           "policy over the app's /v1 endpoint).")] = True,
    runs_dir: Annotated[Path | None, _RUNS_OPT] = None,
) -> None:
    """The closed loop headless: N rounds of online DPO on the seeded arithmetic task with the
    bundled SmolLM2; a table per round and a plot (RUNS_DIR/demo.png)."""
    from loop.config import CONFIG_DIR
    from loop.demo import run_demo
    from store.errors import StoreError

    round_config = _round_config(config or CONFIG_DIR / "demo.toml", None, set_, ray_address,
                                 no_ray)
    context = command_context(ctx)
    db = context.open_database()
    try:
        run_demo(db, round_config, rounds=rounds, runs_dir=_runs_dir(runs_dir),
                 settings=context.settings(), ai_judge=ai_judge, log=_log)
    except StoreError as exc:
        raise fail(str(exc), 1) from None


# ---------------------------------------------------------------------------------------------
# `prefloop up`: the web service (with the labeling UI) and, on a schedule, training rounds


def web_app() -> FastAPI:
    """The app with the labeling UI, from the environment's settings (the factory each
    `prefloop up --workers N` worker process calls)."""
    from app.main import create_app
    from labeling.ui import mount_labeling_ui

    return create_app(ui=mount_labeling_ui)


def up(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[int, typer.Option(
        min=1, help="Worker processes (each with its own rate limits; on SQLite they share "
        "the one writer).")] = 1,
    rounds_every: Annotated[float | None, typer.Option(
        min=1.0, help="Run a training round every this many seconds.")] = None,
    rounds_cron: Annotated[str | None, typer.Option(
        help="Run a training round on this cron expression (e.g. '0 3 * * *').")] = None,
    rounds_after_labels: Annotated[int | None, typer.Option(
        min=1, help="Run a training round once this many new labels have arrived.")] = None,
    round_config: Annotated[Path | None, typer.Option(
        help="The scheduled rounds' TOML config (default loop/configs/round.toml).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(
        envvar="PREFLOOP_RUNS_DIR", help="Where scheduled rounds write their runs.")
    ] = Path("runs"),
) -> None:
    """Serve the API (/api), labeling UI (/label), admin view (/admin), the OpenAPI schema
    (/openapi.json) and the deployed policy (/v1); with --rounds-every/--rounds-cron/
    --rounds-after-labels, also run training rounds on that schedule (at most one at a time,
    across processes)."""
    import os

    import uvicorn

    from app.main import create_app
    from app.web_security import UVICORN_OPTIONS
    from labeling.ui import mount_labeling_ui
    from store import assignment

    context = command_context(ctx)
    db, settings = context.open_database(), context.settings()
    # Rebuild the assignment queue's hints (tasks imported or edited while the app was down).
    db.run_write(lambda s: assignment.sync_queue(session=s, full=True))
    scheduler = None
    if rounds_every is not None or rounds_cron is not None or rounds_after_labels is not None:
        scheduler = _round_scheduler(db, host=host, port=port, every=rounds_every,
                                     cron=rounds_cron, after_labels=rounds_after_labels,
                                     config=round_config, runs_dir=runs_dir)
    typer.echo(f"prefloop on http://{host}:{port}/ (store: {db.url}, {workers} worker(s); "
               f"policy serving at /v1: {settings.serving})")
    options: dict[str, Any] = {"host": host, "port": port, "log_level": log_level,
                               "access_log": False, "timeout_graceful_shutdown": 5}
    # uvicorn would otherwise trust X-Forwarded-For from 127.0.0.1 before the app sees the
    # request; the app decides whom to believe (PREFLOOP_TRUSTED_PROXIES).
    options.update(UVICORN_OPTIONS)
    if scheduler is not None:
        # The scheduler lives in this (the main) process only; the round lock in the store
        # keeps it to one round at a time even if another process schedules too.
        scheduler.start()
        typer.echo(f"rounds: {scheduler.status()}")
    try:
        if workers == 1:
            uvicorn.run(create_app(settings, db=db, ui=mount_labeling_ui), **options)
            return
        db.dispose()
        # Worker processes build their own app from the environment.
        os.environ["PREFLOOP_DB_URL"] = settings.resolved_db_url()
        uvicorn.run("loop.commands:web_app", factory=True, workers=workers, **options)
    finally:
        if scheduler is not None:
            scheduler.stop()


def _round_scheduler(db: Any, *, host: str, port: int, every: float | None, cron: str | None,
                     after_labels: int | None, config: Path | None, runs_dir: Path) -> Any:
    from loop.config import load_round_config
    from loop.demo import operator_token
    from loop.schedule import make_round_scheduler, schedule_from_dict
    from loop.stages.judging import DEPLOYED_MODEL, JudgeEndpoint

    try:
        schedule = schedule_from_dict({"interval_s": every, "cron": cron,
                                       "min_new_labels": after_labels})
        round_config = load_round_config(str(config) if config else None)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    # AI judges in scheduled rounds talk to this server's own /v1 (the deployed policy).
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    endpoint = JudgeEndpoint(f"http://{local}:{port}/v1", api_key=operator_token(db),
                             model=DEPLOYED_MODEL)
    return make_round_scheduler(db, schedule, round_config=round_config,
                                runs_dir=str(runs_dir), judge_endpoint=endpoint)


def register(root: typer.Typer) -> None:
    root.add_typer(round_app, name="round")
    root.command("demo")(demo_command)
    root.command("up")(up)
