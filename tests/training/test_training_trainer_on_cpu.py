"""End-to-end CPU tests of `training.trainer`: every mode on a tiny model, exact resume,
gradient-accumulation invariance, LoRA adapters, and clear errors before any compute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.conftest import write_jsonl
from training import checkpoint as ckpt
from training.config_reader import ConfigError
from training.data import DataError
from training.run_files import TrainingError
from training.trainer import train_from_cli

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.toml"


def run(mode: str, data: Path, model: Path, out: Path, *overrides: str, **kwargs):
    return train_from_cli(mode, data=str(data), model=str(model), out=str(out), config_path=TINY,
                          overrides=list(overrides), **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_dpo_first_step_loss_is_ln2_and_outputs_are_complete(
        preference_file, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run("dpo", preference_file, tiny_model_dir, tmp_path / "run")
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["train/rewards/accuracy"] >= 0.0
    run_info = json.loads((result.run_dir / "run.json").read_text())
    manifest = json.loads(Path(str(preference_file) + ".manifest.json").read_text())
    assert run_info["data_sha256"] == manifest["sha256"] == result.data_sha256
    assert run_info["steps_done"] == 4
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["mode"] == "dpo" and saved["loss_type"] == "sigmoid"
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(model.state_dict().values(), before.state_dict().values(), strict=True))
    assert changed, "training did not change the weights"
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == [
        "step-00000002", "step-00000004"]
    from training.plot import plot_run

    assert plot_run(result.run_dir).stat().st_size > 5000


def test_dpo_on_conversational_rows_uses_the_chat_template(
        chat_preference_file, tiny_model_dir, tmp_path):
    result = run("dpo", chat_preference_file, tiny_model_dir, tmp_path / "run", "max_steps=1",
                 "max_length=128")
    assert metrics(result.run_dir)[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "orpo", "rdpo", "cdpo", "hinge"])
def test_dpo_variants_train(loss_type, preference_file, tiny_model_dir, tmp_path):
    result = run("dpo", preference_file, tiny_model_dir, tmp_path / "run", f"loss_type={loss_type}",
                 "max_steps=2", "save_steps=0", "rdpo_alpha=0.01", "label_smoothing=0.1")
    rows = metrics(result.run_dir)
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    if loss_type == "ipo":
        assert rows[0]["train/loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)
    assert (result.run_dir / "ref_logps.pt").exists() == (loss_type not in ("simpo", "orpo"))


def test_reward_model_bradley_terry_trains_a_scalar_head(preference_file, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = run("rm", preference_file, tiny_model_dir, tmp_path / "run", "max_steps=6",
                 "learning_rate=3e-3")
    rows = metrics(result.run_dir)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert model.score.out_features == 1


def test_reward_model_plackett_luce_on_listwise_export(listwise_file, tiny_model_dir, tmp_path):
    result = run("rm", listwise_file, tiny_model_dir, tmp_path / "run",
                 "loss_type=plackett_luce", "max_steps=3")
    rows = metrics(result.run_dir)
    assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert 0.0 <= rows[-1]["train/rewards/accuracy"] <= 1.0


def test_kto_first_step_loss_is_half(unpaired_file, tiny_model_dir, tmp_path):
    result = run("kto", unpaired_file, tiny_model_dir, tmp_path / "run")
    rows = metrics(result.run_dir)
    # policy = reference: every log-ratio and the KL estimate are 0, each example costs 0.5.
    assert rows[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)


def test_sft_loss_starts_near_uniform_and_decreases(sft_file, tiny_model_dir, tmp_path):
    result = run("sft", sft_file, tiny_model_dir, tmp_path / "run", "max_steps=8",
                 "learning_rate=1e-2", "lr_schedule=constant")
    rows = metrics(result.run_dir)
    assert rows[0]["train/loss"] == pytest.approx(math.log(49152), abs=0.3)  # random init
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0


def test_conditional_sft_trains_on_tagged_preference_rows(preference_file, tiny_model_dir,
                                                          tmp_path):
    result = run("sft", preference_file, tiny_model_dir, tmp_path / "run", "conditional_sft=true",
                 "max_steps=2")
    assert result.report.examples == 16  # each pair gives a good- and a bad-tagged example


def test_lora_run_writes_a_loadable_adapter(preference_file, tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    result = run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "lora=on",
                 "max_steps=2", "lora_r=4")
    assert (result.model_dir / "adapter_config.json").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(result.model_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_interrupted_then_resumed_run_equals_uninterrupted(preference_file, tiny_model_dir,
                                                           tmp_path):
    args = ("max_steps=5", "save_steps=2", "grad_accum_steps=2", "warmup_steps=1")
    straight = run("dpo", preference_file, tiny_model_dir, tmp_path / "a", *args)

    def crash_after_step_3(step, _metrics):
        if step == 3:
            raise KeyboardInterrupt  # like Ctrl-C: steps 1-3 done, checkpoint at step 2 only

    with pytest.raises(KeyboardInterrupt):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "b", *args,
            on_step_end=crash_after_step_3)
    interrupted = ckpt.latest_checkpoint(tmp_path / "b")
    assert interrupted is not None and interrupted.name == "step-00000002"
    (tmp_path / "b" / "checkpoints" / ".tmp-step-00000004-x").mkdir()  # a half-written save
    resumed = run("dpo", preference_file, tiny_model_dir, tmp_path / "b", *args, resume=True)

    assert resumed.steps == straight.steps == 5
    rows_a, rows_b = metrics(straight.run_dir), metrics(resumed.run_dir)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5]  # no replayed or skipped step
    assert [r["train/sample_ids"] for r in rows_a] == [r["train/sample_ids"] for r in rows_b]
    for key in ("train/loss", "train/lr"):
        assert [r[key] for r in rows_a] == pytest.approx([r[key] for r in rows_b], abs=1e-6)
    wa, wb = weights(straight.model_dir), weights(resumed.model_dir)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)
    latest = ckpt.latest_checkpoint(resumed.run_dir)
    assert latest is not None
    state = ckpt.load_state(latest)
    assert state["step"] == 5
    assert max(s["step"] for s in state["optimizer"]["state"].values()) == 5  # Adam steps


def test_gradient_accumulation_matches_one_large_batch(preference_file, tiny_model_dir, tmp_path):
    big = run("dpo", preference_file, tiny_model_dir, tmp_path / "a", "batch_size=4",
              "grad_accum_steps=1", "max_steps=2", "save_steps=0")
    small = run("dpo", preference_file, tiny_model_dir, tmp_path / "b", "batch_size=2",
                "grad_accum_steps=2", "max_steps=2", "save_steps=0")
    rows_a, rows_b = metrics(big.run_dir), metrics(small.run_dir)
    # abs 1e-6: step 2's margin is ~2.5e-3, and on an AVX512 CPU the batch-4 and batch-2 matmuls
    # block differently, so fp32 rounding differs by ~4e-7 there after one Adam step. A wrong
    # accumulation (a missing or doubled 1/grad_accum_steps) moves these figures by ~2x.
    for key in ("train/loss", "train/grad_norm", "train/rewards/margin"):
        assert [r[key] for r in rows_a] == pytest.approx([r[key] for r in rows_b], rel=1e-5,
                                                        abs=1e-6)
    # Adam divides by sqrt(v): float rounding of near-zero gradients is amplified, hence 1e-5
    # (1% of one step at lr 1e-3) rather than exact equality of the weights.
    wa, wb = weights(big.model_dir), weights(small.model_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ errors before compute


def test_empty_export_is_an_error(tmp_path, tiny_model_dir):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty"):
        run("dpo", empty, tiny_model_dir, tmp_path / "run")


def test_manifest_mismatch_is_an_error(preference_file, tiny_model_dir, tmp_path):
    with preference_file.open("a") as handle:
        handle.write('{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    with pytest.raises(DataError, match="does not match"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run")


def test_rows_longer_than_max_length_are_skipped_and_reported(preference_file, tiny_model_dir,
                                                             tmp_path):
    with pytest.raises(DataError, match="longer than max_length"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "max_length=4",
            "overlong=skip")
    result = run("dpo", preference_file, tiny_model_dir, tmp_path / "ok", "max_length=12",
                 "max_steps=1")
    # Long completions are cut; a prompt that alone fills max_length cannot be and is skipped.
    assert result.report.truncated > 0
    assert result.report.examples + result.report.skipped == result.report.rows == 8


def test_missing_reference_for_reference_based_loss_is_an_error(preference_file, tiny_model_dir,
                                                                 tmp_path):
    with pytest.raises(ConfigError, match="reference"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "ref_model=none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run2", "ref_model=./no/such/model")


def test_unknown_lora_target_is_an_error(preference_file, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "lora=on",
            "lora_target_modules=q_proj,attn_c")


def test_wrong_row_shape_for_mode_is_an_error(sft_file, tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="missing field"):
        run("dpo", sft_file, tiny_model_dir, tmp_path / "run")


def test_existing_run_dir_needs_resume(preference_file, tiny_model_dir, tmp_path):
    run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "max_steps=1")
    with pytest.raises(TrainingError, match="--resume"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "max_steps=1")
    with pytest.raises(TrainingError, match="config changed"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "max_steps=1", "beta=0.3",
            resume=True)


@pytest.mark.parametrize("lora", ["off", "on"])
def test_reference_per_step_equals_precomputed_reference(lora, preference_file, tiny_model_dir,
                                                         tmp_path):
    """precompute_ref_logps=false runs the reference every step (a frozen copy, or the LoRA
    model with its adapter disabled); the losses must be those of the precomputed table."""
    args = ("max_steps=3", "save_steps=0", f"lora={lora}", "lora_r=4")
    pre = run("dpo", preference_file, tiny_model_dir, tmp_path / "pre", *args)
    live = run("dpo", preference_file, tiny_model_dir, tmp_path / "live", *args,
               "precompute_ref_logps=false")
    assert not (live.run_dir / "ref_logps.pt").exists()
    losses_pre = [r["train/loss"] for r in metrics(pre.run_dir)]
    losses_live = [r["train/loss"] for r in metrics(live.run_dir)]
    assert losses_live == pytest.approx(losses_pre, abs=1e-6)


def test_gradient_checkpointing_uses_the_full_sequence_path(preference_file, tiny_model_dir,
                                                            tmp_path):
    base = run("dpo", preference_file, tiny_model_dir, tmp_path / "a", "max_steps=2",
               "save_steps=0")
    ckpt_run = run("dpo", preference_file, tiny_model_dir, tmp_path / "b", "max_steps=2",
                   "save_steps=0", "gradient_checkpointing=true")
    assert [r["train/loss"] for r in metrics(ckpt_run.run_dir)] == pytest.approx(
        [r["train/loss"] for r in metrics(base.run_dir)], abs=1e-5)


def test_explicit_reference_model_gives_a_non_trivial_first_loss(preference_file, tiny_model_dir,
                                                                 tokenizer, tmp_path):
    from training.models import save_tiny_model

    other = save_tiny_model(tmp_path / "other", tokenizer, seed=1)
    result = run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "max_steps=1",
                 f"ref_model={other}")
    first = metrics(result.run_dir)[0]
    assert abs(first["train/loss"] - math.log(2)) > 1e-3
    assert first["train/rewards/margin"] != 0.0


def test_attention_kernels_train_the_same_losses(preference_file, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    losses = {}
    for kernel in ("eager", "sdpa"):
        result = run("dpo", preference_file, tiny_model_dir, tmp_path / kernel, "max_steps=3",
                     "save_steps=0", f"attention={kernel}")
        losses[kernel] = [r["train/loss"] for r in metrics(result.run_dir)]
        assert json.loads((result.run_dir / "run.json").read_text())["attention"] == kernel
        # The kernel is a training choice: the saved model loads with transformers' default.
        saved = AutoModelForCausalLM.from_pretrained(result.model_dir)
        assert saved.config._attn_implementation == "sdpa"
    assert losses["eager"] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert losses["eager"][0] == pytest.approx(math.log(2), abs=1e-6)


def test_auto_attention_is_eager_only_for_short_sequences_on_cpu():
    from training.runtime import EAGER_ATTENTION_MAX_LENGTH, attention_implementation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_implementation("auto", cpu, EAGER_ATTENTION_MAX_LENGTH) == "eager"
    assert attention_implementation("auto", cpu, EAGER_ATTENTION_MAX_LENGTH + 1) == "sdpa"
    assert attention_implementation("auto", cuda, 64) == "sdpa"
    assert attention_implementation("sdpa", cpu, 64) == "sdpa"
    assert attention_implementation("eager", cuda, 4096) == "eager"


def test_unknown_attention_kernel_is_a_config_error(preference_file, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="attention"):
        run("dpo", preference_file, tiny_model_dir, tmp_path / "run", "attention=flash")
    assert not (tmp_path / "run").exists()


def test_frozen_lora_base_in_bf16_changes_no_loss_and_no_adapter_weight(
        preference_file, tiny_model_dir, tmp_path, monkeypatch):
    """Under bf16 autocast the trainer stores LoRA's frozen base linears in bf16 (autocast would
    re-cast them at every call): the same bf16 values, so the same losses and adapter."""
    import training.trainer as trainer_module

    args = ("max_steps=3", "save_steps=0", "lora=on", "lora_r=4", "precision=bf16")
    converted: list[int] = []
    real = trainer_module.hold_frozen_linears_in_bf16
    monkeypatch.setattr(trainer_module, "hold_frozen_linears_in_bf16",
                        lambda model: converted.append(real(model)) or converted[-1])
    held = run("dpo", preference_file, tiny_model_dir, tmp_path / "held", *args)
    assert converted and converted[0] > 0
    monkeypatch.setattr(trainer_module, "hold_frozen_linears_in_bf16", lambda model: 0)
    cast = run("dpo", preference_file, tiny_model_dir, tmp_path / "cast", *args)
    assert [r["train/loss"] for r in metrics(held.run_dir)] == \
        [r["train/loss"] for r in metrics(cast.run_dir)]
    held_weights, cast_weights = weights(held.model_dir), weights(cast.model_dir)
    assert held_weights.keys() == cast_weights.keys() and held_weights
    for name, tensor in held_weights.items():
        assert tensor.dtype == torch.float32, name  # the adapter is saved in fp32
        assert torch.equal(tensor, cast_weights[name]), name


def test_hold_frozen_linears_in_bf16_leaves_trainable_and_tied_weights_fp32():
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.policy import hold_frozen_linears_in_bf16

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert hold_frozen_linears_in_bf16(model) == 2 * 7  # q k v o gate up down per layer
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.float32 and model.base_model.model.lm_head.weight is embed
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16
    assert hold_frozen_linears_in_bf16(model) == 0  # nothing left to convert
