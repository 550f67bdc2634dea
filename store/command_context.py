"""What every `prefloop` command receives from the composition root (cli.py).

cli.py builds one object that satisfies `CommandContext` from the global flags (`--db`) and puts
it on typer's context (`ctx.obj`); a package's command takes `ctx: typer.Context` and calls
`command_context(ctx).open_database()`. No package imports cli.py and no module keeps the
database or the settings in a global.

    def stats(ctx: typer.Context) -> None:
        db = command_context(ctx).open_database()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import typer

    from store.db import Database


class CommandContext(Protocol):
    """The database and settings of one `prefloop` invocation."""

    db_url: str | None
    """The `--db` flag (None: PREFLOOP_DB_URL or the default SQLite file)."""

    def settings(self) -> Any:
        """The service settings (`app.settings.Settings`) with `--db` applied."""

    def open_database(self, *, create: bool = True) -> Database:
        """The store at the newest schema; an empty one is migrated when `create`."""


def command_context(ctx: typer.Context) -> CommandContext:
    """The CommandContext cli.py put on the root typer context."""
    obj = ctx.find_root().obj
    if obj is None:
        raise RuntimeError("no command context: run the command through cli.py's app")
    return obj


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise (exit code `code`)."""
    import typer
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: a message may contain brackets (paths, JSON); soft_wrap keeps it on
    # one line for whoever greps the output.
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), message))
    return typer.Exit(code)
