"""The generation engine (training/generation.py) on a tiny random Llama with SmolLM2's tokenizer:
requests that join a running batch get exactly what they get alone, cancelled ones leave it,
streamed text adds up, shared prompts and prefixes change nothing, the KV budget makes requests
wait instead of failing, and a failing model fails only the requests of that step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.draws import assert_same_draws
from training.generation import (
    EngineClosed,
    Errored,
    Finished,
    GenerationEngine,
    SequenceRequest,
    SequenceResult,
    TextDelta,
)

CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "user", "content": "Write a long story about a cat who learns to fly."}],
         [{"role": "user", "content": "Name three colours, please."}]]


@pytest.fixture
def engine(tiny_model_dir: Path) -> Any:
    return GenerationEngine.from_pretrained(str(tiny_model_dir), max_batch=8)


def _request(engine: Any, chat: Any, tokens: int, **kw: Any) -> SequenceRequest:
    return SequenceRequest(tuple(engine.encode(chat)), tokens, **kw)


class Collector:
    """A sink that keeps every event and signals the end."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if not isinstance(event, TextDelta):
            self.done.set()

    @property
    def result(self) -> SequenceResult:
        assert self.done.wait(60)
        assert isinstance(self.events[-1], Finished), self.events[-1]
        return self.events[-1].result


def _alone(tiny_model_dir: Path, request: SequenceRequest) -> SequenceResult:
    return GenerationEngine.from_pretrained(str(tiny_model_dir), max_batch=1).run([request])[0]


def test_a_request_joining_a_running_batch_gets_what_it_gets_alone(engine: Any,
                                                                   tiny_model_dir: Path) -> None:
    first = _request(engine, CHATS[1], 40, temperature=0.0)
    second = _request(engine, CHATS[0], 12, temperature=0.9, seed=5)
    engine.start()
    try:
        running, joining = Collector(), Collector()
        engine.submit(first, running)
        while engine.tokens_generated < 10:  # the first is well into its decoding
            time.sleep(0.01)
        engine.submit(second, joining)
        got = [running.result, joining.result]
    finally:
        engine.close()
    assert engine.peak_batch == 2
    for request, result in zip([first, second], got, strict=True):
        reference = _alone(tiny_model_dir, request)
        assert_same_draws(result.completion_ids, result.logprobs, reference.completion_ids,
                          reference.logprobs)


def test_logprobs_are_the_sampling_distributions_and_alternatives_the_models(
        engine: Any) -> None:
    request = _request(engine, CHATS[0], 8, temperature=0.7, seed=3, top_logprobs=3)
    result = engine.run([request])[0]
    ids = torch.tensor([list(request.prompt_ids) + result.completion_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0, len(request.prompt_ids) - 1:-1]
    tokens = torch.tensor(result.completion_ids).unsqueeze(-1)
    tempered = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens).squeeze(-1)
    plain = torch.log_softmax(logits, -1)
    assert result.logprobs == pytest.approx(tempered.tolist(), abs=1e-4)
    assert result.alternatives is not None
    assert [a.logprob for a in result.alternatives] == pytest.approx(
        plain.gather(-1, tokens).squeeze(-1).tolist(), abs=1e-4)
    top = plain.topk(3, dim=-1)
    for step, alternatives in enumerate(result.alternatives):
        assert [token for token, _ in alternatives.top] == top.indices[step].tolist()
        assert [value for _, value in alternatives.top] == pytest.approx(
            top.values[step].tolist(), abs=1e-4)


def test_cancelling_takes_a_request_out_and_the_others_go_on(engine: Any,
                                                             tiny_model_dir: Path) -> None:
    long = _request(engine, CHATS[1], 200, temperature=0.0, stream=True)
    other = _request(engine, CHATS[2], 20, temperature=0.0)
    engine.start()
    try:
        cancelled, kept = Collector(), Collector()
        handle = engine.submit(long, cancelled)
        engine.submit(other, kept)
        while not any(isinstance(e, TextDelta) for e in cancelled.events):
            time.sleep(0.005)
        handle.cancel()
        assert cancelled.done.wait(30)
        assert kept.result.completion_ids == _alone(tiny_model_dir, other).completion_ids
    finally:
        engine.close()
    result = cancelled.result
    assert result.finish_reason == "cancelled" and 1 <= len(result.completion_ids) < 200
    assert engine.busy == 0


def test_streamed_text_adds_up_to_the_result_cut_before_the_stop_string(
        engine: Any, tiny_model_dir: Path) -> None:
    free = _alone(tiny_model_dir, _request(engine, CHATS[1], 30, temperature=0.0))
    assert len(free.text) > 12
    stop = free.text[6:9]
    sink = Collector()
    engine.submit(_request(engine, CHATS[1], 30, temperature=0.0, stop=(stop,), stream=True),
                  sink)
    while not sink.done.is_set():
        engine.step()
    result = sink.result
    assert result.finish_reason == "stop" and result.text == free.text[:free.text.find(stop)]
    assert "".join(e.text for e in sink.events if isinstance(e, TextDelta)) == result.text
    assert result.completion_ids == free.completion_ids[:len(result.completion_ids)]


def test_shared_prompts_and_a_reused_prefix_change_no_result(tiny_model_dir: Path) -> None:
    engine = GenerationEngine.from_pretrained(str(tiny_model_dir), max_batch=8)
    requests = [_request(engine, chat, 10, temperature=1.0, seed=seed)
                for chat in CHATS for seed in (1, 2)]
    together = engine.run(requests)   # shared prompts, then the chat template's prefix
    assert engine._prefix is not None and len(engine._prefix[0]) >= 16
    again = engine.run(requests[::-1])[::-1]  # the cached prefix is reused
    for request, a, b in zip(requests, together, again, strict=True):
        reference = _alone(tiny_model_dir, request)
        assert a.completion_ids == b.completion_ids  # the same batch in another order
        assert_same_draws(a.completion_ids, a.logprobs, reference.completion_ids,
                          reference.logprobs)


def test_the_kv_budget_makes_requests_wait_not_fail(tiny_model_dir: Path) -> None:
    probe = GenerationEngine.from_pretrained(str(tiny_model_dir))
    per_position = probe.cache.bytes_per_position()
    requests = [_request(probe, CHATS[i % 3], 20, temperature=0.0) for i in range(6)]
    longest = max(len(r.prompt_ids) for r in requests) + 20
    budget_gb = 2.5 * longest * per_position / 2**30  # room for 2 sequences at a time
    engine = GenerationEngine.from_pretrained(str(tiny_model_dir), max_batch=8,
                                              max_context=longest, kv_cache_gb=budget_gb)
    results = engine.run(requests)
    assert engine.peak_batch == 2
    assert [r.completion_ids for r in results] == [
        r.completion_ids for r in probe.run(requests)]


def test_a_request_longer_than_the_context_is_refused_and_nothing_is_queued(
        engine: Any) -> None:
    with pytest.raises(ValueError, match="more than the context this engine allows of 64"):
        GenerationEngine(engine.model, engine.tokenizer, max_context=64).submit(
            SequenceRequest(tuple(range(60)), 5), lambda e: None)
    with pytest.raises(ValueError, match="more than the model's context of 1024"):
        engine.submit(SequenceRequest(tuple(range(1000)), 25), lambda e: None)
    assert engine.busy == 0


def test_a_failing_model_fails_that_steps_requests_and_the_engine_goes_on(engine: Any) -> None:
    engine.start()
    forward = engine.decoder.forward_segments
    try:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("illegal memory access")

        engine.decoder.forward_segments = fail
        failed = Collector()
        engine.submit(_request(engine, CHATS[0], 5), failed)
        assert failed.done.wait(30)
        assert isinstance(failed.events[-1], Errored)
        assert "illegal memory access" in str(failed.events[-1].error)
        engine.decoder.forward_segments = forward
        fine = Collector()
        engine.submit(_request(engine, CHATS[0], 5, temperature=0.0), fine)
        assert len(fine.result.completion_ids) >= 1
    finally:
        engine.decoder.forward_segments = forward
        engine.close()


def test_closing_fails_what_is_queued_and_refuses_new_work(engine: Any) -> None:
    queued = Collector()
    engine.submit(_request(engine, CHATS[0], 5), queued)
    engine.close()
    assert isinstance(queued.events[-1], Errored)
    assert isinstance(queued.events[-1].error, EngineClosed)
    with pytest.raises(EngineClosed):
        engine.submit(_request(engine, CHATS[0], 5), Collector())


def test_a_cache_grown_for_a_long_request_is_cut_back_within_the_budget(
        tiny_model_dir: Path) -> None:
    probe = GenerationEngine.from_pretrained(str(tiny_model_dir))
    per_position = probe.cache.bytes_per_position()
    budget = 8 * 64  # eight short sequences, or two long ones
    engine = GenerationEngine.from_pretrained(str(tiny_model_dir), max_batch=8,
                                              max_context=256,
                                              kv_cache_gb=budget * per_position / 2**30)
    long = _request(engine, CHATS[0], 256 - len(engine.encode(CHATS[0])), temperature=0.0)
    engine.run([long])
    assert engine.cache.capacity == 256
    short = [_request(engine, CHATS[i % 3], 8, temperature=0.0) for i in range(8)]
    results = engine.run(short)
    assert engine.peak_batch == 8
    assert (engine.cache.slots, engine.cache.capacity) == (8, 64)  # 8 x 64 <= the budget
    assert [r.completion_ids for r in results] == [r.completion_ids for r in probe.run(short)]


def test_cancelled_requests_leave_the_queue_at_once(engine: Any) -> None:
    running = Collector()
    engine.max_batch = 1
    engine.submit(_request(engine, CHATS[1], 50, temperature=0.0), running)
    waiting = [Collector() for _ in range(3)]
    handles = [engine.submit(_request(engine, CHATS[0], 5), sink) for sink in waiting]
    engine.step()
    assert engine.busy == 4
    for handle in handles:
        handle.cancel()
    assert engine.busy == 1  # cancelled ones no longer count, though the batch is full
    engine.step()
    assert all(s.result.finish_reason == "cancelled" for s in waiting)
    assert len(engine._pending) == 0


def test_a_step_over_a_queue_of_cancelled_requests_does_nothing(engine: Any) -> None:
    sink = Collector()
    engine.submit(_request(engine, CHATS[0], 5), sink).cancel()
    assert engine.step() == 0  # no forward pass over an empty batch
    assert sink.result.finish_reason == "cancelled" and sink.result.completion_ids == []
    assert engine.busy == 0 and engine.tokens_generated == 0


def test_a_refused_request_in_run_leaves_nothing_queued(engine: Any) -> None:
    fine = _request(engine, CHATS[0], 3, temperature=0.0)
    with pytest.raises(ValueError, match="context"):
        engine.run([fine, fine, SequenceRequest(tuple(range(1000)), 100)])
    assert engine.busy == 0
    before = engine.tokens_generated
    assert len(engine.run([fine])[0].completion_ids) <= 3
    assert engine.tokens_generated - before <= 3  # only this run's request was generated
