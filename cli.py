"""`prefloop`: the one console script and the composition root of the project.

The root callback turns the global flags (`--db`) into one `CliContext` on typer's context
object; every command, here and in the packages' commands modules (registered below), gets the
store and the settings from it (`store.command_context.command_context(ctx)`), never from a
module global. Each command parses its flags, builds a config, and calls one function of a
package. Heavy packages are imported inside the commands that need them, so `prefloop --help`,
`prefloop import` and `prefloop export` start fast.

    prefloop db upgrade
    prefloop import examples/pairwise.jsonl --format pairwise --source demo
    prefloop export --format trl-preference --out prefs.jsonl
    prefloop stats
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from store.command_context import command_context, fail

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.progress import Progress, Task, TaskID

    from app.settings import Settings
    from store.command_context import CommandContext
    from store.db import Database

app = typer.Typer(
    name="prefloop",
    help="Human + AI preference collection and the RLHF feedback loop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Create and migrate the store's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@dataclass
class CliContext:
    """The `store.command_context.CommandContext` of one `prefloop` invocation: the store and
    the settings named by the global flags."""

    db_url: str | None = None

    def settings(self) -> Settings:
        """The service settings from the environment, with --db applied."""
        from pydantic import ValidationError

        from app.settings import get_settings

        try:
            return get_settings(db_url=self.db_url)
        except ValidationError as exc:
            # A bad PREFLOOP_* value: name the variable and what it must be, no traceback.
            problems = "; ".join(
                f"PREFLOOP_{'_'.join(str(p) for p in error['loc']).upper() or 'SETTINGS'}: "
                f"{error['msg']}" for error in exc.errors())
            raise fail(f"bad setting: {problems} (docs/settings.md lists every setting)"
                       ) from None

    def open_database(self, *, create: bool = True) -> Database:
        """The store named by --db / PREFLOOP_DB_URL / the default SQLite file, at the newest
        schema.

        A brand-new (empty) database is migrated to the newest schema on first use when
        `create`; one at an older revision is refused with the command that upgrades it, since
        migrating data is a decision.
        """
        from store import migrate
        from store.db import Database

        settings = self.settings()
        db = Database.from_url(settings.resolved_db_url(),
                               sqlite_synchronous=settings.sqlite_synchronous)
        current, head = migrate.current_revision(db.engine), migrate.head_revision()
        if current is None and create:
            migrate.upgrade(db.engine)
        elif current != head:
            raise fail(f"the store is at schema revision {current}, this prefloop needs {head}: "
                       "run `prefloop db upgrade`")
        return db


def _version(value: bool) -> None:
    if value:
        from store import __version__

        typer.echo(f"prefloop {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(
        "--db", help="Store URL (sqlite:///path.db or postgresql://...). "
        "Default: $PREFLOOP_DB_URL, else ./prefloop-data/prefloop.db.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    # The one object every command reads the store and settings from (typed as the protocol,
    # so mypy checks that CliContext keeps satisfying it).
    context: CommandContext = CliContext(db_url=db)
    ctx.obj = context


# ---------------------------------------------------------------------------------------------
# db


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context,
               revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the store to the newest schema (or to REVISION)."""
    from store import migrate
    from store.db import Database

    db = Database.from_url(command_context(ctx).settings().resolved_db_url())
    migrate.upgrade(db.engine, revision)
    typer.echo(f"{db.url}: at revision {migrate.current_revision(db.engine)}")


@db_app.command("downgrade")
def db_downgrade(ctx: typer.Context,
                 revision: Annotated[str, typer.Argument(help="e.g. -1 or base")]) -> None:
    """Migrate the store back to REVISION."""
    from store import migrate
    from store.db import Database

    db = Database.from_url(command_context(ctx).settings().resolved_db_url())
    migrate.downgrade(db.engine, revision)
    typer.echo(f"{db.url}: at revision {migrate.current_revision(db.engine)}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the store's schema revision and the newest one."""
    from store import migrate
    from store.db import Database

    db = Database.from_url(command_context(ctx).settings().resolved_db_url())
    typer.echo(f"{db.url}: at {migrate.current_revision(db.engine)}, "
               f"head {migrate.head_revision()}")


@db_app.command("check")
def db_check(ctx: typer.Context) -> None:
    """Fail if the store's schema and the code's tables disagree."""
    from store import migrate

    db = command_context(ctx).open_database(create=False)
    try:
        migrate.check(db.engine)
    except Exception as exc:
        raise fail(f"schema drift: {exc}", 1) from None
    typer.echo("schema matches the models")


# ---------------------------------------------------------------------------------------------
# import / export


def _progress_bar(console: Console, get_time: Callable[[], float] | None = None) -> Progress:
    """Done / total, rate and time left on stderr; transient, and off when stderr is not a
    terminal (so piped and captured output holds only the result lines). A task's `unit`
    field names what is counted; `get_time` is rich's clock (a test passes its own)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} {task.fields['unit']}/s",
                        style="progress.data.speed")

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), RateColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal, get_time=get_time)


@app.command("import")
def import_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A JSONL file (formats: docs/formats.md).")],
    format: Annotated[str, typer.Option(
        "--format", "-f", help="prompts | pairwise | listwise | binary | tasks")],
    source: Annotated[str, typer.Option(
        help="Name of where the data comes from; also the default annotator name.")] = "import",
    annotator_kind: Annotated[str, typer.Option(
        help="Kind of the rows' annotator when a row does not say: human | ai | rule")] = "human",
    on_error: Annotated[str, typer.Option(
        help="fail: write nothing if any row is bad; skip: write the good rows")] = "fail",
    dataset: Annotated[str | None, typer.Option(help="Dataset tag for the prompts.")] = None,
    split: Annotated[str | None, typer.Option(help="Split tag for the prompts.")] = None,
    overlap: Annotated[int, typer.Option(
        help="tasks: how many human annotators each task needs.")] = 1,
) -> None:
    """Import prompts, labelled feedback or unlabelled tasks from a JSONL file."""
    from rich.console import Console

    from store.errors import StoreError
    from store.importing import ImportRejected, import_jsonl
    from store.models import AnnotatorKind

    if annotator_kind not in AnnotatorKind.__members__:
        raise fail("--annotator-kind must be human, ai or rule")
    if not file.is_file():
        raise fail(f"{file} is not a file")
    db = command_context(ctx).open_database()
    console = Console(stderr=True)
    total = sum(1 for line in file.open(encoding="utf-8", errors="replace") if line.strip())
    progress = _progress_bar(console)
    try:
        with progress:
            bar = progress.add_task(f"importing {file.name}", total=total, unit="rows")
            report = import_jsonl(
                db, file, format=format, source=source,  # type: ignore[arg-type]
                annotator_kind=AnnotatorKind(annotator_kind),
                on_error=on_error,  # type: ignore[arg-type]
                dataset=dataset, split=split, overlap=overlap,
                on_row=lambda _n: progress.advance(bar),
            )
    except ImportRejected as exc:
        for error in exc.report.errors:
            console.print(f"  {error}", highlight=False, markup=False)
        raise fail(f"{file}: {exc}", 1) from None
    except StoreError as exc:
        raise fail(str(exc)) from None
    for error in report.errors:
        console.print(f"  skipped {error}", highlight=False, markup=False)
    created = ", ".join(f"{v} {k}" for k, v in sorted(report.created.items())) or "nothing new"
    typer.echo(f"{file}: {report.rows_written} of {report.rows_read} rows imported "
               f"({created}); {len(report.errors)} skipped")


@app.command("export")
def export_command(
    ctx: typer.Context,
    format: Annotated[str, typer.Option(
        "--format", "-f", help="trl-preference | trl-unpaired | sft | listwise")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output JSONL file.")],
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="Keep labels from: human | ai | rule | all (repeatable).")] = None,
    min_agreement: Annotated[float, typer.Option(
        help="Drop rows whose annotators agree less than this (0..1).")] = 0.0,
    dataset: Annotated[str | None, typer.Option(help="Only prompts of this dataset.")] = None,
    split: Annotated[str | None, typer.Option(help="Only prompts of this split.")] = None,
    round_id: Annotated[int | None, typer.Option("--round", help="Only this round's tasks.")
                        ] = None,
    pairs_as_unpaired: Annotated[bool, typer.Option(
        help="trl-unpaired: also write each preference pair as a desirable and an "
        "undesirable row (for KTO).")] = False,
    min_judge_agreement: Annotated[float, typer.Option(
        help="Drop AI/rule labels whose judge's calibrated agreement with humans is below "
        "this (uncalibrated judges count as 0); see `prefloop judge calibrate`.")] = 0.0,
    weight_ai_by_agreement: Annotated[bool, typer.Option(
        help="Weighted majority: a human label weighs 1, an AI/rule label its judge's "
        "calibrated agreement.")] = False,
    shape: Annotated[str, typer.Option(
        help="One shape per file, as TRL needs: auto (chat if any row is conversational, "
        "else text) | chat (text rows become one user turn + an assistant turn) | text "
        "(conversational rows are dropped).")] = "auto",
) -> None:
    """Export aggregated labels as a training file plus FILE.manifest.json."""
    from rich.console import Console

    from store.errors import StoreError
    from store.exporting import ExportFilters, export_jsonl

    try:
        filters = ExportFilters(
            sources=tuple(source or ["all"]), min_agreement=min_agreement, dataset=dataset,
            split=split, round_id=round_id, pairs_as_unpaired=pairs_as_unpaired,
            min_judge_agreement=min_judge_agreement,
            weight_ai_by_agreement=weight_ai_by_agreement,
            shape=shape,  # type: ignore[arg-type]
        )
        db = command_context(ctx).open_database()
        progress = _progress_bar(Console(stderr=True))
        bars: dict[str, TaskID] = {}  # one bar per phase: its rate and ETA count one unit

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                unit = "tasks" if phase == "reading" else "rows"
                bars[phase] = progress.add_task(f"{phase} {out.name}", total=total, unit=unit)
            progress.update(bars[phase], completed=done, total=total)

        with progress:

            result = export_jsonl(db, format=format, out=out,  # type: ignore[arg-type]
                                  filters=filters, on_progress=on_progress)
    except StoreError as exc:
        raise fail(str(exc)) from None
    skipped = ", ".join(f"{k}={v}" for k, v in result.counts.items() if k.startswith("skipped"))
    converted = result.counts.get("converted_to_chat", 0)
    shaped = result.shape + (f", {converted} text rows as chat" if converted else "")
    typer.echo(f"{out}: {result.rows} rows ({shaped}), sha256 {result.sha256[:16]}…"
               f"{'; ' + skipped if skipped else ''}; manifest {result.manifest_path}")


@app.command("stats")
def stats_command(ctx: typer.Context) -> None:
    """Counts of prompts, completions, tasks and labels by kind and source."""
    from rich.console import Console
    from rich.table import Table

    from store.queries import store_counts

    db = command_context(ctx).open_database()
    with db.read() as session:
        counts = store_counts(session)
    table = Table("what", "count", title=f"prefloop store ({db.url})")
    for key, value in counts.items():
        table.add_row(key, str(value))
    Console().print(table)


# Command groups of the other packages. Each `register(root)` adds typer commands that parse
# flags and call that package's functions; the modules import their heavy dependencies lazily,
# inside the commands. A package whose commands module is not present yet adds none.
COMMAND_MODULES = ("app.commands", "feedback.commands", "training.commands", "loop.commands")


def _register_package_commands() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        package = name.partition(".")[0]
        # find_spec of a submodule imports its package, so look for the package first.
        if importlib.util.find_spec(package) is None or importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(app)


_register_package_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
