"""`prefloop up` and `prefloop users ...`: the web service's commands (registered by cli.py).

    prefloop users add ana --role admin        # the token is the last line printed
    prefloop users list
    prefloop users token ana                   # a new token for an existing account
    prefloop users revoke ana                  # revoke all of ana's tokens
    prefloop up --host 127.0.0.1 --port 8000
    prefloop deploy round-2                    # smoke-test, then make it the deployed version
    prefloop deploy base --weights smollm2-135m-instruct   # register a model folder and deploy
    prefloop rollback                          # back to the version deployed before
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from sqlmodel import Session

users_app = typer.Typer(help="Accounts of annotators and admins, and their API tokens.",
                        no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _cli() -> Any:
    # `python cli.py ...` runs cli as __main__; importing `cli` again would give a second copy
    # whose STATE never saw --db. Use the running one when that is the case.
    main = sys.modules.get("__main__")
    if main is not None and hasattr(main, "STATE") and hasattr(main, "open_database"):
        return main
    import cli

    return cli


def _store_and_settings() -> tuple[Any, Any]:
    from app.settings import get_settings

    cli = _cli()
    return cli.open_database(), get_settings(db_url=cli.STATE.db_url)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Account name (used to log in).")],
    role: Annotated[str, typer.Option(help="annotator | admin")] = "annotator",
    ttl_days: Annotated[float | None, typer.Option(
        help="Token lifetime in days (default: PREFLOOP_TOKEN_TTL_DAYS, 90).")] = None,
) -> None:
    """Create an account and print its API token (shown once, on the last line)."""
    from store import accounts
    from store.errors import StoreError
    from store.models import Role

    if role not in Role.__members__:
        raise _fail("--role must be annotator or admin")
    db, settings = _store_and_settings()
    ttl = timedelta(days=ttl_days or settings.token_ttl_days)
    try:
        annotator, token = db.run_write(lambda s: accounts.create_account(
            session=s, name=name, role=Role(role), token_ttl=ttl))
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"created {role} {annotator.name!r} (id {annotator.id}); token valid for "
               f"{ttl.days} days, shown once:")
    typer.echo(token)


@users_app.command("token")
def users_token(
    name: Annotated[str, typer.Argument(help="Account name.")],
    ttl_days: Annotated[float | None, typer.Option(help="Token lifetime in days.")] = None,
) -> None:
    """Issue a new API token for an existing account (printed on the last line)."""
    from store import accounts
    from store.errors import StoreError

    db, settings = _store_and_settings()
    ttl = timedelta(days=ttl_days or settings.token_ttl_days)

    def issue(session: Session) -> str:
        annotator = accounts.account_by_name(session=session, name=name)
        assert annotator.id is not None
        token, _ = accounts.issue_token(session=session, annotator_id=annotator.id,
                                        ttl=ttl, name="cli")
        return token

    try:
        token = db.run_write(issue)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(token)


@users_app.command("revoke")
def users_revoke(name: Annotated[str, typer.Argument(help="Account name.")]) -> None:
    """Revoke every token (API and browser sessions) of an account."""
    from store import accounts
    from store.errors import StoreError

    db, _ = _store_and_settings()

    def revoke(session: Session) -> int:
        annotator = accounts.account_by_name(session=session, name=name)
        assert annotator.id is not None
        return accounts.revoke_tokens(session=session, annotator_id=annotator.id)

    try:
        n = db.run_write(revoke)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"revoked {n} token(s) of {name!r}")


@users_app.command("list")
def users_list() -> None:
    """Accounts with their role and number of live tokens."""
    from store import accounts

    db, _ = _store_and_settings()
    with db.read() as session:
        rows = accounts.list_accounts(session=session)
    for annotator, live in rows:
        role = annotator.role.value if annotator.role else "-"
        typer.echo(f"{annotator.id}\t{annotator.name}\t{role}\t"
                   f"{'active' if annotator.active else 'inactive'}\t{live} live token(s)")


def up(
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
        help="The scheduled rounds' TOML config (default feedback/configs/round.toml).")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(
        envvar="PREFLOOP_RUNS_DIR", help="Where scheduled rounds write their runs.")
    ] = Path("runs"),
) -> None:
    """Serve the API (/api), labeling UI (/label), admin view (/admin), docs (/docs) and the
    deployed policy (/v1); with --rounds-every/--rounds-cron/--rounds-after-labels, also run
    training rounds on that schedule (at most one at a time, across processes)."""
    import os

    import uvicorn

    from app.main import create_app
    from store import assignment

    db, settings = _store_and_settings()
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
    if scheduler is not None:
        # The scheduler lives in this (the main) process only; the round lock in the store
        # keeps it to one round at a time even if another process schedules too.
        scheduler.start()
        typer.echo(f"rounds: {scheduler.status()}")
    try:
        if workers == 1:
            uvicorn.run(create_app(settings, db=db), **options)
            return
        db.dispose()
        # Worker processes build their own app from the environment.
        os.environ["PREFLOOP_DB_URL"] = settings.resolved_db_url()
        uvicorn.run("app.main:create_app", factory=True, workers=workers, **options)
    finally:
        if scheduler is not None:
            scheduler.stop()


def _round_scheduler(db: Any, *, host: str, port: int, every: float | None, cron: str | None,
                     after_labels: int | None, config: Path | None, runs_dir: Path) -> Any:
    from feedback.demo import operator_token
    from feedback.rounds import DEPLOYED_MODEL, JudgeEndpoint, load_round_config
    from feedback.schedule import ScheduleConfig, make_round_scheduler

    try:
        schedule = ScheduleConfig(interval_s=every, cron=cron, min_new_labels=after_labels)
        round_config = load_round_config(str(config) if config else None)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    # AI judges in scheduled rounds talk to this server's own /v1 (the deployed policy).
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    endpoint = JudgeEndpoint(f"http://{local}:{port}/v1", api_key=operator_token(db),
                             model=DEPLOYED_MODEL)
    return make_round_scheduler(db, schedule, round_config=round_config,
                                runs_dir=str(runs_dir), judge_endpoint=endpoint)


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def deploy(
    version: Annotated[str, typer.Argument(help="Policy version id or name.")],
    weights: Annotated[str | None, typer.Option(
        help="Register VERSION first with this model folder (or bundled model name) when it "
        "does not exist yet.")] = None,
    base_model: Annotated[str | None, typer.Option(
        help="base_model of a version registered with --weights (default: --weights).")] = None,
    smoke_timeout: Annotated[float | None, typer.Option(
        min=0.1, help="Seconds the smoke generation may take (default: "
        "PREFLOOP_SERVING_SMOKE_TIMEOUT_S, 60).")] = None,
) -> None:
    """Smoke-test a policy version in this process (load it, answer the fixed smoke prompt
    within the timeout), then make it the deployed version. A running `prefloop up` switches
    to it within its poll interval; nothing changes if the smoke test fails (exit 2)."""
    from app.deploy import SmokeFailed, prepare
    from app.serving import ServedPolicy
    from store import deployments
    from store.errors import NotFound, StoreError

    db, settings = _store_and_settings()
    if smoke_timeout is not None:
        settings = settings.model_copy(update={"serving_smoke_timeout_s": smoke_timeout})
    if settings.serving == "off":
        settings = settings.model_copy(update={"serving": "hf"})
    try:
        with db.read() as session:
            policy = deployments.find_policy(session, version)
    except NotFound:
        if weights is None:
            raise _fail(f"no policy version {version!r}; give its id or name, or --weights "
                        "PATH to register it") from None
        try:
            policy = db.run_write(lambda s: deployments.register_policy(
                s, name=version, base_model=base_model or weights, weights_uri=weights))
        except StoreError as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"registered {policy.name!r} (id {policy.id}) from {weights}")
    else:
        if weights is not None and weights != policy.weights_uri:
            raise _fail(f"{policy.name!r} exists with weights {policy.weights_uri!r}, not "
                        f"{weights!r}")
    assert policy.id is not None
    if policy.status.value == "deployed":
        typer.echo(f"{policy.name!r} (id {policy.id}) is already the deployed version")
        return
    if policy.status.value == "rejected" or not policy.weights_uri:
        with db.read() as session:
            reason = deployments.last_reason(session, policy_id=policy.id)
        raise _fail(f"{policy.name!r} was rejected" + (f" ({reason})" if reason else "")
                    + "; register the weights again under a new name to deploy them")
    served = ServedPolicy(policy.id, policy.name, policy.base_model, policy.weights_uri)
    typer.echo(f"smoke-testing {policy.name!r} ({policy.weights_uri}) on the "
               f"{settings.serving} backend ...")
    try:
        engine, check = prepare(served, settings)
    except (SmokeFailed, ImportError) as exc:
        raise _fail(f"{policy.name!r} not deployed: {exc}") from None
    engine.close()
    typer.echo(f"smoke generation ok in {check.smoke_s:.2f} s (load {check.load_s:.2f} s): "
               f"{check.smoke_text!r}")
    try:
        db.run_write(lambda s: deployments.promote(s, policy_id=served.id, actor=_actor()))
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"deployed {policy.name!r} (id {policy.id}); a running `prefloop up` switches "
               f"to it within {settings.serving_poll_interval_s:g} s")


def rollback() -> None:
    """Deploy again the version that was deployed before the current one (the current one is
    retired). A running `prefloop up` keeps the previous version loaded, so it switches back
    at once."""
    from store import deployments
    from store.errors import StoreError

    db, _ = _store_and_settings()
    try:
        with db.read() as session:
            current = deployments.deployed(session)
        restored = db.run_write(lambda s: deployments.rollback(s, actor=_actor()))
    except StoreError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"rolled back from {current.name if current else None!r} to {restored.name!r} "
               f"(id {restored.id})")


def register(root: typer.Typer) -> None:
    root.add_typer(users_app, name="users")
    root.command("up")(up)
    root.command("deploy")(deploy)
    root.command("rollback")(rollback)
