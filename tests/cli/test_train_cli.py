"""The store -> training hand-off through the CLI: import, export, `prefloop train`, `plot`;
`prefloop train ppo` (and the online commands) refusing bad flags, and one PPO run end to end."""

import json
import subprocess
import sys
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
        (["train", "foo", "--data", str(empty), "--model", "x", "--out", str(tmp_path / "o")],
         "No such command 'foo'"),
        (["train", "dpo", "--data", str(empty), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "o"), "--set", "no_such_key=1"], "no_such_key"),
        (["train", "dpo", "--data", str(empty), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "o")], "empty"),
        (["plot", str(tmp_path)], "no metrics.jsonl"),
    ]:
        result = runner.invoke(cli.app, args, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir):
    import torch

    from training.models import load_reward_backbone, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(3)
    model = load_reward_backbone(str(tiny_model_dir), tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}=?\nA:", "answer": str(2 * i)})
                            + "\n" for i in range(4)))
    return path


def test_ppo_and_online_commands_refuse_bad_flags_with_exit_2(tmp_path, tiny_model_dir,
                                                              tiny_rm_dir):
    runner = CliRunner()
    prompts = _prompts(tmp_path / "prompts.jsonl")
    out = str(tmp_path / "o")
    ppo = ["train", "ppo", "--prompts", str(prompts), "--model", str(tiny_model_dir),
           "--out", out]
    for args, message in [
        (["train", "ppo", "--prompts", str(tmp_path / "none.jsonl"), "--model", "m", "--out",
          out, "--reward-model", "rm"], "prompts file"),
        ([*ppo], "exactly one reward source"),
        ([*ppo, "--reward-model", str(tiny_rm_dir), "--set", "reward=rule:format"],
         "exactly one reward source"),
        ([*ppo, "--reward-model", str(tiny_rm_dir), "--colocate", "actor,critic"],
         "choose actor,ref or critic,reward"),
        ([*ppo, "--reward-model", str(tiny_rm_dir), "--set", "no_such_key=1"], "no_such_key"),
        ([*ppo, "--reward-model", str(tiny_rm_dir), "--set", "steps=zero"],
         "steps must be an integer"),
        ([*ppo, "--reward-model", str(tmp_path / "missing-rm")], "does not exist"),
        ([*ppo, "--reward-model", str(tiny_rm_dir), "--config", str(tmp_path / "no.toml")],
         "config file"),
        (["train", "ppo", "--model", "m", "--out", out], "Missing option '--prompts'"),
        (["train", "grpo", "--prompts", str(tmp_path / "none.jsonl"), "--model", "m", "--out",
          out], "prompts file"),
    ]:
        result = runner.invoke(cli.app, args, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
    assert not (tmp_path / "o" / "config.json").exists()  # nothing half-written


def test_ppo_through_the_cli_with_both_colocations(tmp_path, tiny_model_dir, tiny_rm_dir):
    """`prefloop train ppo` as a subprocess (its own local Ray): 1 step, 2 Ray actors."""
    out = tmp_path / "run"
    args = [sys.executable, "cli.py", "train", "ppo", "--prompts",
            str(_prompts(tmp_path / "prompts.jsonl")), "--model", str(tiny_model_dir),
            "--reward-model", str(tiny_rm_dir), "--colocate", "actor,ref",
            "--colocate", "critic,reward", "--out", str(out), "--set", "steps=1",
            "--set", "rollout_batch_size=2", "--set", "mini_batch_size=2",
            "--set", "max_new_tokens=4", "--set", "lora=off", "--set", "progress=false"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900,
                          cwd=Path(cli.__file__).parent, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 steps; model in" in done.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["layout"] == [["actor", "ref"], ["critic", "reward"]] and run["steps_done"] == 1
    assert json.loads((out / "config.json").read_text())["colocate_actor_ref"] is True
    assert (out / "model" / "config.json").is_file()
    # the same command again refuses to overwrite the run (before starting Ray)
    again = CliRunner().invoke(cli.app, args[2:], catch_exceptions=False)
    assert again.exit_code == 2 and "already holds a run" in again.output
