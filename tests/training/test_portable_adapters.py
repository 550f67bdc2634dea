"""Saved LoRA folders travel: a run folder moved (with its base, or to a machine whose cache holds
the bundled model elsewhere) loads through every prefloop loader with the same outputs; a base
that is gone is a clear error naming what was tried."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from training.models import (
    ADAPTER_BASE_FILE,
    COMPLETE_MARKER,
    ModelNotFoundError,
    load_policy,
    resolve_adapter_base,
)
from training.trainer import train_from_cli

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.toml"
INPUT = torch.tensor([[1, 17, 300, 4000, 12]])


def lora_run(mode: str, data: Path, model: str, out: Path) -> Path:
    train_from_cli(mode, data=str(data), model=model, out=str(out), config_path=TINY,
                   overrides=["lora=on", "lora_r=4", "max_steps=2", "learning_rate=0.05"])
    assert (out / "model" / "adapter_config.json").is_file()
    return out


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / ADAPTER_BASE_FILE).read_text())


def test_run_folder_moved_with_its_base_loads_with_the_same_logits(
        preference_file, tiny_model_dir, tmp_path):
    site = tmp_path / "site"
    base = shutil.copytree(tiny_model_dir, site / "base")
    run = lora_run("dpo", preference_file, str(base), site / "run")
    assert record(run / "model") == {"original": str(base), "bundled": None,
                                     "relative": "../../base"}
    checkpoint = run / "checkpoints" / "step-00000002" / "model"
    assert record(checkpoint)["relative"] == "../../../../base"
    before = logits(load_policy(str(run / "model")))
    assert not torch.equal(before, logits(load_policy(str(base))))  # the adapter changed it

    moved = shutil.move(site, tmp_path / "elsewhere" / "site2")  # the original path is gone
    assert not base.exists()
    moved_run = Path(moved) / "run"
    assert resolve_adapter_base(moved_run / "model") == str((Path(moved) / "base").resolve())
    assert torch.equal(logits(load_policy(str(moved_run / "model"))), before)
    assert torch.equal(logits(load_policy(str(moved_run / "checkpoints" / "step-00000002" /
                                              "model"))), before)


def test_reward_model_adapter_moved_with_its_base_scores_the_same(
        preference_file, tiny_model_dir, tmp_path):
    from training.ppo_batch import load_scalar_model
    from training.rewards import RewardModelScorer

    site = tmp_path / "site"
    base = shutil.copytree(tiny_model_dir, site / "base")
    run = lora_run("rm", preference_file, str(base), site / "run")
    prompts, texts = ["Question: What is 2+2?\nAnswer:"] * 2, [" 4", " 5"]
    scores = RewardModelScorer.load(str(run))(prompts, texts, [None, None])
    scalar = load_scalar_model(str(run / "model"), pad_token_id=0)
    with torch.no_grad():
        value = scalar(INPUT).logits

    moved = Path(shutil.move(site, tmp_path / "copied-site"))
    assert RewardModelScorer.load(str(moved / "run"))(prompts, texts, [None, None]) == scores
    moved_scalar = load_scalar_model(str(moved / "run" / "model"), pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(moved_scalar(INPUT).logits, value)


def test_adapter_moved_without_its_base_is_a_clear_error(preference_file, tiny_model_dir,
                                                         tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    run = lora_run("dpo", preference_file, str(base), tmp_path / "run")
    moved = Path(shutil.move(run, tmp_path / "deep" / "run"))
    shutil.rmtree(base)
    expected_relative = (moved / "model" / "../../base").resolve()
    with pytest.raises(ModelNotFoundError) as info:
        load_policy(str(moved / "model"))
    assert str(info.value) == (
        f"the base model of LoRA adapter {moved / 'model'} is not found (tried {base}, "
        f"{expected_relative}); put the base there, or merge the adapter where it loads "
        "(prefloop train merge)")


def _fake_bundled_cache(root: Path, tiny_model_dir: Path) -> Path:
    """A cache whose bundled model (and tokenizer) is the tiny model: what `convert_bundled_*`
    would have published there, so no 135M conversion runs in the test."""
    for kind in ("models", "tokenizers"):
        folder = shutil.copytree(tiny_model_dir, root / kind / "smollm2-135m-instruct")
        (folder / COMPLETE_MARKER).write_text("ok\n")
    return root / "models" / "smollm2-135m-instruct"


def test_bundled_base_is_recorded_by_name_and_found_in_another_cache(
        preference_file, tiny_model_dir, tmp_path, monkeypatch):
    first = _fake_bundled_cache(tmp_path / "cache-a", tiny_model_dir)
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache-a"))
    run = lora_run("dpo", preference_file, "smollm2-135m-instruct", tmp_path / "run")
    saved = json.loads((run / "model" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(first)
    assert record(run / "model")["bundled"] == "smollm2-135m-instruct"
    before = logits(load_policy(str(run / "model")))

    # "Another machine": the run folder copied, a different cache root, the old one gone.
    copied = Path(shutil.copytree(run, tmp_path / "other-machine" / "run"))
    shutil.rmtree(tmp_path / "cache-a")
    second = _fake_bundled_cache(tmp_path / "cache-b", tiny_model_dir)
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache-b"))
    assert resolve_adapter_base(copied / "model") == str(second)
    assert torch.equal(logits(load_policy(str(copied / "model"))), before)


def test_full_model_folders_get_no_record(preference_file, tiny_model_dir, tmp_path):
    result = train_from_cli("dpo", data=str(preference_file), model=str(tiny_model_dir),
                            out=str(tmp_path / "run"), config_path=TINY,
                            overrides=["max_steps=1"])
    assert (result.model_dir / "config.json").is_file()
    assert not (result.model_dir / ADAPTER_BASE_FILE).exists()
