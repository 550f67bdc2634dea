"""`prefloop up` and `prefloop users ...`: the web service's commands (registered by cli.py).

    prefloop users add ana --role admin        # the token is the last line printed
    prefloop users list
    prefloop users token ana                   # a new token for an existing account
    prefloop users revoke ana                  # revoke all of ana's tokens
    prefloop up --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import sys
from datetime import timedelta
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
) -> None:
    """Serve the API (/api), labeling UI (/label), admin view (/admin) and docs (/docs)."""
    import os

    import uvicorn

    from app.main import create_app
    from store import assignment

    db, settings = _store_and_settings()
    # Rebuild the assignment queue's hints (tasks imported or edited while the app was down).
    db.run_write(lambda s: assignment.sync_queue(session=s, full=True))
    typer.echo(f"prefloop on http://{host}:{port}/ (store: {db.url}, {workers} worker(s))")
    options: dict[str, Any] = {"host": host, "port": port, "log_level": log_level,
                               "access_log": False, "timeout_graceful_shutdown": 5}
    if workers == 1:
        uvicorn.run(create_app(settings, db=db), **options)
        return
    db.dispose()
    # Worker processes build their own app from the environment.
    os.environ["PREFLOOP_DB_URL"] = settings.resolved_db_url()
    uvicorn.run("app.main:create_app", factory=True, workers=workers, **options)


def register(root: typer.Typer) -> None:
    root.add_typer(users_app, name="users")
    root.command("up")(up)
