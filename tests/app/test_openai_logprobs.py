"""Token log-probabilities on /v1/chat/completions (`logprobs: true, top_logprobs: k`), through
the real `openai` client against a live server, checked against a teacher-forced forward pass
of the same model: each token's log-probability, its top alternatives in order, and the tokens
spelling the answer."""

from __future__ import annotations

import math

import openai
import pytest

from tests.app.serving_fixtures import *  # noqa: F403  (fixtures and helpers)

CHAT = [{"role": "user", "content": "Name a colour."}]


def reference_greedy(weights, messages, steps):
    """The greedy answer by hand: `steps` full forward passes, each taking the argmax of the
    last position. Returns the tokenizer and, per step, (token id, its log-probability, the
    log-softmax row)."""
    import torch

    from training.models import load_policy, load_tokenizer

    tokenizer = load_tokenizer(str(weights))
    model = load_policy(str(weights), dtype=torch.float32).eval()
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False))
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            token = int(row.argmax())
            out.append((token, float(row[token]), row))
            ids.append(token)
    return tokenizer, out


def test_logprobs_equal_a_forward_pass_and_top_logprobs_are_the_likeliest(served_v1,
                                                                         tiny_policies):
    response = served_v1.client().chat.completions.create(
        model="v1", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    choice = response.choices[0]
    content = choice.logprobs.content
    tokenizer, reference = reference_greedy(tiny_policies["v1"], CHAT, len(content))
    assert len(content) == response.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == choice.message.content
    for entry, (token, logprob, row) in zip(content, reference, strict=True):
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        top = entry.top_logprobs
        values, ids = row.topk(5)
        assert [t.token for t in top] == [tokenizer.decode([int(i)]) for i in ids]
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        # Greedy: the chosen token is the likeliest one.
        assert (top[0].token, top[0].logprob) == (entry.token, pytest.approx(entry.logprob))
        assert sum(math.exp(t.logprob) for t in top) <= 1 + 1e-6


def test_logprobs_without_top_and_without_logprobs(served_v1):
    client = served_v1.client()
    plain = client.chat.completions.create(model="v1", messages=CHAT, max_tokens=4,
                                           temperature=0)
    assert plain.choices[0].logprobs is None
    bare = client.chat.completions.create(model="v1", messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True)
    content = bare.choices[0].logprobs.content
    assert [t.top_logprobs for t in content] == [[]] * len(content)
    assert "".join(t.token for t in content) == plain.choices[0].message.content


def test_a_stop_string_cuts_the_logprobs_with_the_text(served_v1):
    client = served_v1.client()
    full = client.chat.completions.create(model="v1", messages=CHAT, max_tokens=8,
                                          temperature=0, logprobs=True)
    tokens = [t.token for t in full.choices[0].logprobs.content]
    stop = tokens[3].strip() or tokens[3]
    cut = client.chat.completions.create(model="v1", messages=CHAT, max_tokens=8,
                                         temperature=0, logprobs=True, stop=[stop])
    text = cut.choices[0].message.content
    kept = [t.token for t in cut.choices[0].logprobs.content]
    assert text == full.choices[0].message.content.split(stop)[0]
    # The tokens that spell the text, and at most the one that runs into the stop string.
    assert "".join(kept).startswith(text) and len("".join(kept[:-1])) < max(len(text), 1)
    assert kept == tokens[:len(kept)]


def test_logprobs_are_refused_with_400_when_streaming(served_v1):
    with pytest.raises(openai.BadRequestError, match="non-streaming requests only"):
        served_v1.client(max_retries=0).chat.completions.create(
            model="v1", messages=CHAT, max_tokens=4, logprobs=True, stream=True)
