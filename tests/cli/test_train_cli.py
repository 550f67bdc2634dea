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


# ------------------------------------------------------------------ prefloop train merge


@pytest.fixture(scope="module")
def lora_run_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA DPO run trained through the CLI (2 steps; the adapter moved off zero)."""
    tmp = tmp_path_factory.mktemp("lora-run")
    runner = CliRunner()
    db = ["--db", f"sqlite:///{tmp / 'store.db'}"]
    for args in (["import", str(EXAMPLES / "pairwise.jsonl"), "--format", "pairwise"],
                 ["export", "--format", "trl-preference", "--out", str(tmp / "prefs.jsonl")],
                 ["train", "dpo", "--data", str(tmp / "prefs.jsonl"), "--model",
                  str(tiny_model_dir), "--out", str(tmp / "run"), "--config", str(TINY_CONFIG),
                  "--set", "max_steps=2", "--set", "lora=on", "--set", "lora_r=4",
                  "--set", "learning_rate=0.05"]):
        result = runner.invoke(cli.app, [*db, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert (tmp / "run" / "model" / "adapter_config.json").is_file()
    return tmp / "run"


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([[1, 17, 300, 4000, 12, 9]])).logits


def test_train_merge_writes_a_full_folder_with_the_adapters_logits(tmp_path, lora_run_dir,
                                                                   tiny_model_dir):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "cli.py", "train", "merge", "--adapter",
                           str(lora_run_dir), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=Path(cli.__file__).parent, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # (the last line: importing DeepSpeed, via PEFT, prints an accelerator notice to stdout)
    assert done.stdout.splitlines()[-1] == \
        f"{out}: {lora_run_dir / 'model'} merged onto {tiny_model_dir}"
    assert not (out / "adapter_config.json").exists()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT
    assert type(merged).__name__ == "LlamaForCausalLM"
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora_run_dir / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = _logits(adapter)
    assert torch.allclose(_logits(merged), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(base), expected, atol=1e-3, rtol=0)  # LoRA did something
    assert AutoTokenizer.from_pretrained(out)("Hello").input_ids == \
        AutoTokenizer.from_pretrained(tiny_model_dir)("Hello").input_ids


def test_train_merge_refuses_bad_input_and_writes_nothing(tmp_path, lora_run_dir,
                                                          tiny_model_dir):
    import shutil

    runner = CliRunner()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    orphan = tmp_path / "orphan"  # an adapter whose base is gone
    shutil.copytree(lora_run_dir / "model", orphan)
    (orphan / "prefloop_base_model.json").write_text(json.dumps(
        {"original": str(tmp_path / "gone"), "bundled": None, "relative": "../gone"}))
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    for args, message in [
        (["--adapter", str(lora_run_dir), "--out", str(busy)],
         f"--out {busy} already exists and is not empty (pass --overwrite to replace it)"),
        (["--adapter", str(tiny_model_dir), "--out", str(tmp_path / "a")],
         f"{tiny_model_dir} is neither a LoRA adapter folder (adapter_config.json) nor a run "
         "folder whose model/ is one"),
        (["--adapter", str(lora_run_dir), "--out", str(lora_run_dir / "model" / "m")],
         f"--out {lora_run_dir / 'model' / 'm'} is inside the adapter folder "
         f"{lora_run_dir / 'model'}; choose another folder"),
        (["--adapter", str(orphan), "--out", str(tmp_path / "b")],
         f"the base model of LoRA adapter {orphan} is not found (tried {tmp_path / 'gone'}, "
         f"{tmp_path / 'gone'}); put the base there, or merge the adapter where it loads "
         "(prefloop train merge)"),
    ]:
        result = runner.invoke(cli.app, ["train", "merge", *args], catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert result.output == f"error: {message}\n", result.output
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "orphan"]
    full_run = tmp_path / "busy"  # a run whose model/ is a full folder
    shutil.copytree(tiny_model_dir, full_run / "model")
    result = runner.invoke(cli.app, ["train", "merge", "--adapter", str(full_run), "--out",
                                     str(tmp_path / "c")], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output == (f"error: {full_run / 'model'} is already a full model folder: "
                             "nothing to merge\n")


def test_train_merge_overwrite_replaces_the_folder(tmp_path, lora_run_dir):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    args = ["train", "merge", "--adapter", str(lora_run_dir / "model"), "--out", str(out),
            "--overwrite"]
    result = CliRunner().invoke(cli.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left


# ------------------------------------------------------------------ --ray-address failures


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_cli(args, *, hide_grpc=False):
    """`prefloop ...` as a subprocess; hide_grpc runs it as if the ray[client] extra (grpcio)
    were not installed, whatever this environment holds."""
    prelude = "import sys; sys.modules['grpc'] = None; " if hide_grpc else "import sys; "
    code = prelude + "sys.argv[0] = 'prefloop'; import cli; cli.main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, cwd=Path(cli.__file__).parent, check=False)


def _error_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_ray_addresses_without_a_cluster_fail_with_a_message_naming_the_address(
        tmp_path, tiny_model_dir, tiny_rm_dir):
    prompts = str(_prompts(tmp_path / "prompts.jsonl"))
    port = _free_port()  # nothing listens there
    cases = [
        ("grpo", f"ray://127.0.0.1:{port}",
         f"error: no Ray cluster at ray://127.0.0.1:{port}: Connection refused"),
        ("rs", f"127.0.0.1:{port}", f"error: no Ray cluster at 127.0.0.1:{port}: "
         "Connection refused"),
        ("ppo", f"127.0.0.1:{port}", f"error: no Ray cluster at 127.0.0.1:{port}: "
         "Connection refused"),
        ("online-dpo", "no-port-here", "error: Ray address 'no-port-here' is not "
         "ray://HOST:PORT, HOST:PORT or auto"),
    ]
    for algo, address, message in cases:
        out = tmp_path / f"run-{algo}"
        reward = (["--reward-model", str(tiny_rm_dir)] if algo == "ppo"
                  else ["--reward", "rule:format"])
        done = _run_cli(["train", algo, "--prompts", prompts, "--model", str(tiny_model_dir),
                         "--out", str(out), *reward, "--ray-address", address,
                         "--ray-connect-timeout", "5"])
        assert done.returncode == 1, (algo, done.stderr[-2000:])
        assert _error_lines(done) == [message], done.stderr[-2000:]
        assert not out.exists()  # nothing written


def test_ray_client_address_without_the_client_extra_names_the_pip_command(
        tmp_path, tiny_model_dir):
    import socket

    with socket.socket() as server:  # something listens: only the missing extra is wrong
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        done = _run_cli(["train", "grpo", "--prompts", str(_prompts(tmp_path / "p.jsonl")),
                         "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                         "--ray-address", f"ray://127.0.0.1:{port}"], hide_grpc=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert _error_lines(done) == [
        f"error: ray://127.0.0.1:{port} is a Ray Client address, which needs the ray[client] "
        'extra: pip install "ray[client]" (or give the cluster\'s GCS address HOST:6379 from '
        "a machine inside the cluster)"]
    assert not (tmp_path / "run").exists()


def test_a_silent_listener_fails_after_the_connect_timeout(tmp_path, tiny_model_dir):
    """Something accepts TCP but never speaks Ray: Ray alone would retry for minutes."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        done = _run_cli(["train", "grpo", "--prompts", str(_prompts(tmp_path / "p.jsonl")),
                         "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                         "--ray-address", f"127.0.0.1:{port}", "--ray-connect-timeout", "3"])
    assert done.returncode == 1, done.stderr[-2000:]
    assert _error_lines(done) == [
        f"error: could not join the Ray cluster at 127.0.0.1:{port} within 3 s (something "
        "listens there but Ray did not answer; raise PREFLOOP_RAY_CONNECT_TIMEOUT or "
        "--ray-connect-timeout if it is slow)"]
    assert not (tmp_path / "run").exists()


def test_ray_address_help_lists_the_gcs_address_first_and_names_the_client_extra():
    result = CliRunner().invoke(cli.app, ["train", "grpo", "--help"], catch_exceptions=False)
    text = " ".join(result.output.replace("│", " ").split())  # rich's box, wrapped lines joined
    assert result.exit_code == 0
    assert text.index("HOST:6379") < text.index("ray://HOST:10001")
    assert 'needs pip install "ray[client]"' in text
    assert "--ray-connect-timeout" in text
