"""The `prefloop` CLI: import/export/stats/db through the real command, exit codes, start-up."""

import json
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
    assert (rows[0]["chosen"], rows[0]["agreement"]) == ("2 + 2 = 4.", 1.0)
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
