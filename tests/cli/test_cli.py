"""The `prefloop` CLI: import/export/stats/db through the real command, exit codes, start-up."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HEAVY = ("torch", "transformers", "gradio", "ray", "deepspeed", "vllm", "openai", "peft",
         "fastapi", "uvicorn", "matplotlib", "trl")


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'store.db'}"

    def invoke(*args: str):
        return runner.invoke(cli.app, ["--db", url, *args], catch_exceptions=False)

    return invoke


def test_import_then_export_through_the_cli(run, tmp_path):
    result = run("import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise",
                 "--source", "demo")
    assert result.exit_code == 0, result.output
    assert "5 of 5 rows imported" in result.output
    out = tmp_path / "prefs.jsonl"
    result = run("export", "--format", "trl-preference", "--out", str(out), "--source", "human")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # The store mixes text and chat rows, so the file is all chat (--shape auto).
    assert (rows[0]["chosen"], rows[0]["agreement"]) == (
        [{"role": "assistant", "content": "2 + 2 = 4."}], 1.0)
    assert len(rows) == 3
    manifest = json.loads((tmp_path / "prefs.jsonl.manifest.json").read_text())
    assert manifest["rows"] == 3 and manifest["filters"]["sources"] == ["human"]
    stats = run("stats")
    assert stats.exit_code == 0 and "labels.pairwise.human" in stats.output


def test_a_bad_file_fails_with_line_numbers_and_writes_nothing(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "x", "rejected": "y"}\n{"prompt": "p"}\n')
    result = run("import", str(bad), "--format", "pairwise")
    assert result.exit_code == 1
    assert "line 2: missing field 'chosen'" in result.output
    assert "nothing was written" in result.output
    out = tmp_path / "o.jsonl"
    assert run("export", "--format", "trl-preference", "--out", str(out)).exit_code == 0
    assert out.read_text() == ""
    skipped = run("import", str(bad), "--format", "pairwise", "--on-error", "skip")
    assert skipped.exit_code == 0 and "1 of 2 rows imported" in skipped.output


@pytest.mark.parametrize(
    "args",
    [["import", "missing.jsonl", "--format", "pairwise"],
     ["import", str(EXAMPLES / "pairwise.jsonl"), "--format", "csv"],
     ["import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise",
      "--annotator-kind", "robot"],
     ["export", "--format", "trl-preference", "--out", "x.jsonl", "--source", "robots"],
     ["export", "--format", "parquet", "--out", "x.jsonl"]],
)
def test_bad_arguments_get_a_clear_error_and_exit_2(run, args):
    result = run(*args)
    assert result.exit_code == 2
    assert "error:" in result.output


def test_db_commands_report_the_revision(run):
    from store import migrate

    assert run("db", "upgrade").exit_code == 0
    current = run("db", "current")
    assert f"at {migrate.head_revision()}" in current.output
    assert run("db", "check").exit_code == 0
    assert run("db", "downgrade", "base").exit_code == 0
    refused = run("import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise")
    # A store at base (empty, alembic_version present) is treated as new and migrated.
    assert refused.exit_code == 0, refused.output


@pytest.mark.parametrize("name, value, says", [
    ("PREFLOOP_OVERLAP", "abc", "PREFLOOP_OVERLAP: Input should be a valid integer"),
    ("PREFLOOP_GOLD_RATE", "2", "PREFLOOP_GOLD_RATE: Input should be less than or equal to 1"),
    ("PREFLOOP_TRUSTED_PROXIES", "10.0.0.300", "'10.0.0.300' is not an IP address"),
])
def test_a_bad_setting_is_a_clear_error_naming_the_variable(run, monkeypatch, tmp_path, name,
                                                            value, says):
    monkeypatch.setenv(name, value)
    result = run("import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise")
    assert result.exit_code == 2
    assert "error: bad setting" in result.output and says in result.output
    assert "Traceback" not in result.output
    monkeypatch.delenv(name)
    # Nothing was written: the same import afterwards finds an empty store.
    assert "5 of 5 rows imported" in run("import", str(EXAMPLES / "pairwise.jsonl"),
                                         "--format", "pairwise").output


def test_an_old_schema_is_refused_with_the_upgrade_command(run):
    assert run("db", "upgrade", "0001").exit_code == 0
    result = run("stats")
    assert result.exit_code == 2 and "prefloop db upgrade" in result.output


def test_help_and_version_load_no_heavy_package():
    code = (
        "import sys, cli\n"
        "try:\n    cli.app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(cli.__file__).parent)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--rounds-cron", "every tuesday"], "not a valid cron expression"),
     (["--rounds-every", "60", "--round-config", "missing.toml"], "missing.toml"),
     (["--rounds-every", "0"], "--rounds-every")],
)
def test_up_refuses_a_bad_round_schedule_before_serving(run, args, message):
    result = run("up", "--port", "1", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "prefloop on http" not in result.output  # nothing was started


# ------------------------------------------------------------------ export: shape and progress


def _import_examples(run) -> None:
    for name in ("pairwise", "listwise", "binary"):
        result = run("import", str(EXAMPLES / f"{name}.jsonl"), "--format", name)
        assert result.exit_code == 0, result.output


def test_export_of_a_mixed_store_prints_its_shape_and_no_bar_off_a_terminal(run, tmp_path):
    _import_examples(run)
    out = tmp_path / "prefs.jsonl"
    result = run("export", "--format", "trl-preference", "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "prefs.jsonl.manifest.json").read_text())
    # The whole output (stdout and stderr) is the one result line: no progress bar off a tty.
    assert result.output == (
        f"{out}: 11 rows (chat, 10 text rows as chat), sha256 {manifest['sha256'][:16]}…; "
        f"skipped_tie=1; manifest {out}.manifest.json\n")
    assert manifest["shape"] == "chat"
    text = run("export", "--format", "trl-preference", "--out", str(out), "--shape", "text")
    assert text.exit_code == 0, text.output
    assert f"{out}: 10 rows (text), sha256" in text.output
    assert "skipped_conversational=1" in text.output
    assert all(isinstance(json.loads(line)["prompt"], str) for line in out.read_text().splitlines())


def test_export_refuses_an_unknown_shape_and_writes_nothing(run, tmp_path):
    out = tmp_path / "prefs.jsonl"
    result = run("export", "--format", "trl-preference", "--out", str(out), "--shape", "xml")
    assert (result.exit_code, result.output) == (
        2, "error: shape must be one of auto, text, chat\n")
    assert not out.exists() and not (tmp_path / "store.db").exists()


def test_export_shows_a_transient_progress_bar_on_a_terminal(run, tmp_path):
    """A real `prefloop export` with stderr on a pseudo-terminal, as a user at a shell sees it."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    _import_examples(run)
    out = tmp_path / "prefs.jsonl"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "--db", f"sqlite:///{tmp_path / 'store.db'}", "export",
         "--format", "trl-preference", "--out", str(out)],
        cwd=Path(cli.__file__).parent, stdout=subprocess.PIPE, stderr=slave,
        env={**env, "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait() == 0
    screen = b"".join(chunks).decode()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert re.search(r"reading prefs\.jsonl ━+ 5/5\s+tasks", plain), plain
    assert re.search(r"writing prefs\.jsonl ━+ 11/11 rows", plain), plain
    # Transient: the last frame is erased (cursor up, erase line, once per bar).
    assert screen.endswith("\x1b[1A\x1b[2K\x1b[1A\x1b[2K")
    assert stdout.startswith(f"{out}: 11 rows (chat, 10 text rows as chat)")


def test_progress_bar_shows_done_of_total_the_rate_and_the_time_left():
    from io import StringIO

    from rich.console import Console

    clock = [0.0]
    console = Console(file=StringIO(), force_terminal=True, width=120, color_system=None)
    progress = cli._progress_bar(console, get_time=lambda: clock[0])
    bar = progress.add_task("writing x.jsonl", total=200, unit="rows")
    for done in (50, 100):  # 50 rows a second
        clock[0] += 1.0
        progress.update(bar, completed=done)
    console.print(progress.get_renderable())
    line = console.file.getvalue().strip()  # type: ignore[attr-defined]
    # Half of the 40-cell bar filled, 100 rows at 50 rows/s, 100 left: 2 s.
    assert line == "writing x.jsonl " + "━" * 20 + " " * 20 + " 100/200 rows 50 rows/s 0:00:02"
