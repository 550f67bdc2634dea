"""The store -> training hand-off through the CLI: import, export, `prefloop train`, `plot`."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY_CONFIG = Path(cli.__file__).parent / "training" / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from training.models import convert_bundled_tokenizer, load_tokenizer, save_tiny_model

    tokenizer = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer, seed=0)


def test_export_trains_dpo_and_the_run_names_the_export(tmp_path, tiny_model_dir):
    runner = CliRunner()
    db = ["--db", f"sqlite:///{tmp_path / 'store.db'}"]

    def run(*args):
        result = runner.invoke(cli.app, [*db, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise")
    run("import", str(EXAMPLES / "listwise.jsonl"), "--format", "listwise")
    export = tmp_path / "prefs.jsonl"
    run("export", "--format", "trl-preference", "--out", str(export))
    manifest = json.loads((tmp_path / "prefs.jsonl.manifest.json").read_text())

    out = tmp_path / "run"
    result = run("train", "dpo", "--data", str(export), "--model", str(tiny_model_dir),
                 "--out", str(out), "--config", str(TINY_CONFIG), "--set", "max_steps=2")
    assert "2 steps" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 2 and config["mode"] == "dpo"
    # The run records exactly which export it trained on.
    assert manifest["sha256"][:16] in result.output
    recorded = json.dumps([json.loads(p.read_text()) for p in out.glob("*.json")])
    assert manifest["sha256"] in recorded

    png = run("plot", str(out)).output.strip()
    assert Path(png).is_file() and Path(png).read_bytes()[:4] == b"\x89PNG"


def test_train_refuses_bad_input_before_any_compute(tmp_path, tiny_model_dir):
    runner = CliRunner()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args, message in [
        (["train", "ppo", "--data", str(empty), "--model", "x", "--out", str(tmp_path / "o")],
         "mode must be one of"),
        (["train", "dpo", "--data", str(empty), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "o"), "--set", "no_such_key=1"], "no_such_key"),
        (["train", "dpo", "--data", str(empty), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "o")], "empty"),
        (["plot", str(tmp_path)], "no metrics.jsonl"),
    ]:
        result = runner.invoke(cli.app, args, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
