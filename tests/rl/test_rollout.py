"""The Hugging Face rollout engine on a tiny random Llama: log-probs, stop strings, seeds, batching,
weight sync (in process and through a Ray actor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.draws import assert_same_draws
from training.rollout import (
    HFRolloutEngine,
    Rollout,
    SamplingParams,
    policy_weights_for_sync,
)
from training.rollout_ray import RayRolloutEngine, make_engine

PROMPTS: list[Any] = [
    [{"role": "user", "content": "What is 2+2?"}],
    "Question: name a colour.\nAnswer:",
    [{"role": "user", "content": "Write a long story about a cat who learns to fly."}],
]


@pytest.fixture(scope="module")
def engine(tiny_policy_dir: Path) -> HFRolloutEngine:
    return HFRolloutEngine(str(tiny_policy_dir), batch_size=8)


def _teacher_forced_logprobs(model: Any, rollout: Rollout, temperature: float) -> list[float]:
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(rollout.completion_ids).unsqueeze(-1)).squeeze(-1
                                                                                        ).tolist()


def test_sampled_logprobs_equal_a_teacher_forced_recomputation(engine: HFRolloutEngine) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=0.7, n=3, seed=1)
    results = engine.generate(PROMPTS, params)
    assert [len(samples) for samples in results] == [3, 3, 3]
    for prompt_index, samples in enumerate(results):
        for sample_index, rollout in enumerate(samples):
            assert (rollout.prompt_index, rollout.sample_index) == (prompt_index, sample_index)
            assert len(rollout.logprobs) == len(rollout.completion_ids) >= 1
            expected = _teacher_forced_logprobs(engine.model, rollout, 0.7)
            assert rollout.logprobs == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_samples_and_other_seed_other_samples(engine: HFRolloutEngine) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=7)
    first = engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=2, seed=8))
    ids = [[r.completion_ids for r in samples] for samples in first]
    assert ids == [[r.completion_ids for r in samples] for samples in second]
    assert ids != [[r.completion_ids for r in samples] for samples in other]
    assert ids[0][0] != ids[0][1]  # the n samples of one prompt differ


def test_a_sample_does_not_depend_on_the_rest_of_the_batch(engine: HFRolloutEngine) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=3)
    together = engine.generate(PROMPTS, params)
    engine.batch_size = 2  # one prompt (2 samples) in the batch at a time
    try:
        apart = engine.generate(PROMPTS, params)
    finally:
        engine.batch_size = 8
    for samples, alone in zip(together, apart, strict=True):
        for got, want in zip(samples, alone, strict=True):
            assert_same_draws(got.completion_ids, got.logprobs, want.completion_ids,
                              want.logprobs)


def test_batched_greedy_equals_one_prompt_at_a_time(engine: HFRolloutEngine) -> None:
    params = SamplingParams(max_new_tokens=15, temperature=0.0)
    batched = engine.generate(PROMPTS, params)
    for index, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], params)[0][0]
        assert alone.completion_ids == batched[index][0].completion_ids
        assert alone.logprobs == pytest.approx(batched[index][0].logprobs, abs=1e-4)
        assert alone.prompt_ids == batched[index][0].prompt_ids


def test_length_finish_and_stop_strings_cut_the_text(engine: HFRolloutEngine) -> None:
    free = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0][0]
    assert free.finish_reason == "length" and len(free.completion_ids) == 20
    # A stop string taken from the middle of the unconstrained text.
    text = free.text
    assert len(text) > 8
    stop = text[4:7]
    cut = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                      stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert len(cut.completion_ids) < 20
    assert cut.completion_ids == free.completion_ids[: len(cut.completion_ids)]
    assert stop in engine.tokenizer.decode(cut.completion_ids)
    kept = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=20, temperature=0.0,
                                                       stop=(stop,), include_stop=True))[0][0]
    assert kept.text == text[: text.find(stop) + len(stop)]
    assert kept.completion_ids == cut.completion_ids


def test_end_of_sequence_token_stops_and_is_kept_in_the_ids(tiny_policy_dir: Path) -> None:
    engine = HFRolloutEngine(str(tiny_policy_dir))
    eos = engine.tokenizer.eos_token_id
    head = engine.model.lm_head.weight.detach().clone()
    head[eos] = 50.0  # make EOS overwhelmingly likely: the lm_head row of EOS is huge
    engine.load_state_dict({"lm_head.weight": head,
                            "model.norm.weight": engine.model.model.norm.weight.abs()})
    rollout = engine.generate(["Hi"], SamplingParams(max_new_tokens=5, temperature=0.0))[0][0]
    assert rollout.finish_reason == "stop"
    assert rollout.completion_ids[-1] == eos
    assert engine.tokenizer.eos_token not in rollout.text


def test_load_state_dict_syncs_weights_and_rejects_unknown_names(tiny_policy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = HFRolloutEngine(str(tiny_policy_dir))
    learner = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(PROMPTS[:1], params)[0][0]
    engine.load_state_dict(policy_weights_for_sync(learner))
    after = engine.generate(PROMPTS[:1], params)[0][0]
    expected = _teacher_forced_logprobs(learner, after, 1.0)
    assert after.logprobs == pytest.approx(expected, abs=1e-4)
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-4)
    with pytest.raises(KeyError, match="not in the rollout model"):
        engine.load_state_dict({"nope.weight": torch.zeros(1)})


def test_lora_sync_sends_merged_weights_of_the_wrapped_layers_only(tiny_policy_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                              "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    state = policy_weights_for_sync(model)
    assert sorted(state) == sorted(f"model.layers.{i}.self_attn.{m}.weight"
                                   for i in range(2) for m in ("q_proj", "v_proj"))
    merged = model.merge_and_unload()
    for name, tensor in state.items():
        assert torch.allclose(tensor, merged.state_dict()[name], atol=1e-6)


def test_sampling_params_are_validated() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match="'hf' or 'vllm'"):
        make_engine("tgi", "x")  # type: ignore[arg-type]


def test_engine_in_a_ray_actor_generates_and_syncs(local_ray: None, tiny_policy_dir: Path,
                                                   engine: HFRolloutEngine) -> None:
    from transformers import AutoModelForCausalLM

    remote = RayRolloutEngine("hf", str(tiny_policy_dir), num_cpus=1, num_threads=1,
                              batch_size=8)
    try:
        params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=11)
        assert [[r.completion_ids for r in s] for s in remote.generate(PROMPTS, params)] == \
            [[r.completion_ids for r in s] for s in engine.generate(PROMPTS, params)]
        learner = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
        with torch.no_grad():
            learner.lm_head.weight.mul_(3.0)  # tied: the embeddings change too
        remote.load_state_dict(policy_weights_for_sync(learner))
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        synced = remote.generate(PROMPTS[:1], greedy)[0][0]
        assert synced.logprobs == pytest.approx(_teacher_forced_logprobs(learner, synced, 1.0),
                                                abs=1e-4)
    finally:
        remote.shutdown()
