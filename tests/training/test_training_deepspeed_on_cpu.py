"""The same training loop under a DeepSpeed ZeRO engine, single process on CPU (gloo).

The first `deepspeed.initialize` on a machine JIT-builds a small communication extension (~40 s,
cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later runs take seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.training.test_training_trainer_on_cpu import metrics, run, weights

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_dpo_matches_the_plain_loop(stage, preference_file, tiny_model_dir, tmp_path):
    import torch

    args = ("max_steps=3", "save_steps=0", "grad_accum_steps=2")
    plain = run("dpo", preference_file, tiny_model_dir, tmp_path / "plain", *args)
    engine = run("dpo", preference_file, tiny_model_dir, tmp_path / stage, *args, deepspeed=stage)
    rows_p, rows_d = metrics(plain.run_dir), metrics(engine.run_dir)
    assert rows_d[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("train/loss", "train/grad_norm"):
        assert [r[key] for r in rows_d] == pytest.approx([r[key] for r in rows_p], rel=1e-4)
    assert json.loads((engine.run_dir / "run.json").read_text())["deepspeed"] == stage
    wp, wd = weights(plain.model_dir), weights(engine.model_dir)
    for name in wp:
        torch.testing.assert_close(wp[name], wd[name], rtol=0, atol=1e-5)


def test_deepspeed_zero2_reward_model_runs(preference_file, tiny_model_dir, tmp_path):
    result = run("rm", preference_file, tiny_model_dir, tmp_path / "rm", "max_steps=2",
                 deepspeed="zero2")
    assert all(math.isfinite(r["train/loss"]) for r in metrics(result.run_dir))
    assert (Path(result.model_dir) / "config.json").exists()


def test_deepspeed_zero2_resume_equals_uninterrupted(preference_file, tiny_model_dir, tmp_path):
    import torch

    args = ("max_steps=4", "save_steps=2")
    straight = run("dpo", preference_file, tiny_model_dir, tmp_path / "a", *args,
                   deepspeed="zero2")

    def crash_after_step_3(step, _metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "b", *args, deepspeed="zero2",
            on_step_end=crash_after_step_3)
    resumed = run("dpo", preference_file, tiny_model_dir, tmp_path / "b", *args,
                  deepspeed="zero2", resume=True)
    rows_a, rows_b = metrics(straight.run_dir), metrics(resumed.run_dir)
    assert [r["train/sample_ids"] for r in rows_a] == [r["train/sample_ids"] for r in rows_b]
    assert [r["train/loss"] for r in rows_a] == pytest.approx(
        [r["train/loss"] for r in rows_b], abs=1e-6)
    wa, wb = weights(straight.model_dir), weights(resumed.model_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    (["deepspeed=zero2", "batch_size=3"], "batch_size=3 .* divisible by the number of ranks"),
    (["deepspeed=none"], "multi-process training runs under DeepSpeed"),
])
def test_multi_process_configs_that_cannot_work_fail_before_any_compute(
        overrides, message, monkeypatch, tmp_path):
    """A 2-rank launch whose micro-batch cannot be split evenly, or without DeepSpeed (which does
    the gradient all-reduce), fails with a clear error before the data is even read."""
    from training.run_files import TrainingError
    from training.trainer import train_from_cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match=message):
        train_from_cli("dpo", data=str(tmp_path / "missing.jsonl"), model="m",
                       out=str(tmp_path / "run"), overrides=overrides)
    assert not (tmp_path / "run").exists()
