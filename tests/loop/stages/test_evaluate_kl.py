"""The evaluate stage's KL: exact per-position KL against a closed form, and the trajectory KL
the generation engines compute (batched, the shared prefix once) equal to Hugging Face's own
forward pass on two tiny models built in-process."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from loop.stages.evaluate import token_kl, trajectory_kls  # noqa: E402


def test_token_kl_equals_the_closed_form():
    p, q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    logits_p = torch.log(torch.tensor([p, q])) + 3.0  # a shift must not matter
    logits_q = torch.log(torch.tensor([q, q]))
    kl = token_kl(logits_p, logits_q)
    assert kl[0].item() == pytest.approx(expected, abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def two_tiny_models(tmp_path_factory):
    from training.generation import GenerationEngine
    from training.models import (
        convert_bundled_tokenizer,
        load_policy,
        load_tokenizer,
        save_tiny_model,
    )

    tokenizer = load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))
    paths = [save_tiny_model(tmp_path_factory.mktemp(f"tiny-{seed}"), tokenizer, seed=seed)
             for seed in (0, 1)]
    models = [load_policy(str(path), dtype=torch.float32).eval() for path in paths]
    engines = [GenerationEngine(load_policy(str(path), dtype=torch.float32), tokenizer)
               for path in paths]
    return models, engines


def test_trajectory_kl_on_the_engines_equals_hf_one_sequence_at_a_time(two_tiny_models):
    (policy_model, reference_model), (policy, reference) = two_tiny_models
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(10, 1000, (20,), generator=generator).tolist()  # a common prefix
    sequences = []
    for prompt_len, completion_len in ((5, 3), (9, 7), (4, 0), (12, 1), (6, 11)):
        ids = torch.randint(10, 1000, (prompt_len + completion_len,), generator=generator)
        sequences.append((shared + ids.tolist(), len(shared) + prompt_len))
    batched = trajectory_kls(policy, reference, sequences, batch_size=4)
    single = trajectory_kls(policy, reference, sequences, batch_size=1)
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched[2] == 0.0  # an empty completion has no KL
    assert all(kl > 0 for i, kl in enumerate(batched) if i != 2)
    for i, (ids, n_prompt) in enumerate(sequences):
        # By hand with Hugging Face's forward: the positions that predict the completion.
        with torch.no_grad():
            lp = policy_model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:len(ids) - 1]
            lr = reference_model(input_ids=torch.tensor([ids])).logits[0,
                                                                       n_prompt - 1:len(ids) - 1]
        assert batched[i] == pytest.approx(float(token_kl(lp, lr).sum()), abs=1e-4)
    assert trajectory_kls(policy, policy, sequences) == [0.0] * len(sequences)
