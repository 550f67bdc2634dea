"""`prefloop users ...`, `prefloop deploy` and `prefloop rollback`: the web service's commands
(registered by cli.py; `prefloop up`, the service with the round scheduler, is loop/commands.py).

    prefloop users add ana --role admin        # the token is the last line printed
    prefloop users list
    prefloop users token ana                   # a new token for an existing account
    prefloop users revoke ana                  # revoke all of ana's tokens
    prefloop deploy round-2                    # smoke-test, then make it the deployed version
    prefloop deploy base --weights smollm2-135m-instruct   # register a model folder and deploy
    prefloop rollback                          # back to the version deployed before
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from store.command_context import command_context, fail

if TYPE_CHECKING:
    from sqlmodel import Session

users_app = typer.Typer(help="Accounts of annotators and admins, and their API tokens.",
                        no_args_is_help=True)


@users_app.command("add")
def users_add(
    ctx: typer.Context,
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
        raise fail("--role must be annotator or admin")
    context = command_context(ctx)
    db, settings = context.open_database(), context.settings()
    ttl = timedelta(days=ttl_days or settings.token_ttl_days)
    try:
        annotator, token = db.run_write(lambda s: accounts.create_account(
            session=s, name=name, role=Role(role), token_ttl=ttl))
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"created {role} {annotator.name!r} (id {annotator.id}); token valid for "
               f"{ttl.days} days, shown once:")
    typer.echo(token)


@users_app.command("token")
def users_token(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Account name.")],
    ttl_days: Annotated[float | None, typer.Option(help="Token lifetime in days.")] = None,
) -> None:
    """Issue a new API token for an existing account (printed on the last line)."""
    from store import accounts
    from store.errors import StoreError

    context = command_context(ctx)
    db, settings = context.open_database(), context.settings()
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
        raise fail(str(exc)) from None
    typer.echo(token)


@users_app.command("revoke")
def users_revoke(ctx: typer.Context,
                 name: Annotated[str, typer.Argument(help="Account name.")]) -> None:
    """Revoke every token (API and browser sessions) of an account."""
    from store import accounts
    from store.errors import StoreError

    db = command_context(ctx).open_database()

    def revoke(session: Session) -> int:
        annotator = accounts.account_by_name(session=session, name=name)
        assert annotator.id is not None
        return accounts.revoke_tokens(session=session, annotator_id=annotator.id)

    try:
        n = db.run_write(revoke)
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"revoked {n} token(s) of {name!r}")


@users_app.command("list")
def users_list(ctx: typer.Context) -> None:
    """Accounts with their role and number of live tokens."""
    from store import accounts

    db = command_context(ctx).open_database()
    with db.read() as session:
        rows = accounts.list_accounts(session=session)
    for annotator, live in rows:
        role = annotator.role.value if annotator.role else "-"
        typer.echo(f"{annotator.id}\t{annotator.name}\t{role}\t"
                   f"{'active' if annotator.active else 'inactive'}\t{live} live token(s)")


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def deploy(
    ctx: typer.Context,
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
    from app.policy_engine import ServedPolicy
    from store import deployments
    from store.errors import NotFound, StoreError

    context = command_context(ctx)
    db, settings = context.open_database(), context.settings()
    if smoke_timeout is not None:
        settings = settings.model_copy(update={"serving_smoke_timeout_s": smoke_timeout})
    if settings.serving == "off":
        settings = settings.model_copy(update={"serving": "hf"})
    try:
        with db.read() as session:
            policy = deployments.find_policy(session, version)
    except NotFound:
        if weights is None:
            raise fail(f"no policy version {version!r}; give its id or name, or --weights "
                        "PATH to register it") from None
        try:
            policy = db.run_write(lambda s: deployments.register_policy(
                s, name=version, base_model=base_model or weights, weights_uri=weights))
        except StoreError as exc:
            raise fail(str(exc)) from None
        typer.echo(f"registered {policy.name!r} (id {policy.id}) from {weights}")
    else:
        if weights is not None and weights != policy.weights_uri:
            raise fail(f"{policy.name!r} exists with weights {policy.weights_uri!r}, not "
                        f"{weights!r}")
    assert policy.id is not None
    if policy.status.value == "deployed":
        typer.echo(f"{policy.name!r} (id {policy.id}) is already the deployed version")
        return
    if policy.status.value == "rejected" or not policy.weights_uri:
        with db.read() as session:
            reason = deployments.last_reason(session, policy_id=policy.id)
        raise fail(f"{policy.name!r} was rejected" + (f" ({reason})" if reason else "")
                    + "; register the weights again under a new name to deploy them")
    served = ServedPolicy(policy.id, policy.name, policy.base_model, policy.weights_uri)
    typer.echo(f"smoke-testing {policy.name!r} ({policy.weights_uri}) on the "
               f"{settings.serving} backend ...")
    try:
        engine, check = prepare(served, settings)
    except (SmokeFailed, ImportError) as exc:
        raise fail(f"{policy.name!r} not deployed: {exc}") from None
    engine.close()
    typer.echo(f"smoke generation ok in {check.smoke_s:.2f} s (load {check.load_s:.2f} s): "
               f"{check.smoke_text!r}")
    try:
        db.run_write(lambda s: deployments.promote(s, policy_id=served.id, actor=_actor()))
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"deployed {policy.name!r} (id {policy.id}); a running `prefloop up` switches "
               f"to it within {settings.serving_poll_interval_s:g} s")


def rollback(ctx: typer.Context) -> None:
    """Deploy again the version that was deployed before the current one (the current one is
    retired). A running `prefloop up` keeps the previous version loaded, so it switches back
    at once."""
    from store import deployments
    from store.errors import StoreError

    db = command_context(ctx).open_database()
    try:
        with db.read() as session:
            current = deployments.deployed(session)
        restored = db.run_write(lambda s: deployments.rollback(s, actor=_actor()))
    except StoreError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"rolled back from {current.name if current else None!r} to {restored.name!r} "
               f"(id {restored.id})")


def register(root: typer.Typer) -> None:
    root.add_typer(users_app, name="users")
    root.command("deploy")(deploy)
    root.command("rollback")(rollback)
