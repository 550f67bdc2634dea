"""The local serving engine: /v1 generates with the in-process generation engine
(training/generation.py), so concurrent requests share each decode step (continuous batching),
stream their tokens, and leave the batch when their client goes away.

torch and transformers are imported when an engine is built, never at import. Requests beyond
`max_batch` running wait in the engine's queue; beyond `max_batch + max_queue` the engine
answers Busy (503) at once instead of piling up work until memory runs out.

    engine = LocalEngine(ServedPolicy(1, "v1", "smollm2-135m-instruct", "smollm2-135m-instruct"))
    print(generate_blocking(engine, GenerationRequest(prompt="Say hi."), timeout_s=60).text)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from app.policy_engine import (
    MIN_LOGPROB,
    Busy,
    Delta,
    Done,
    EngineBase,
    EngineFailed,
    Failed,
    Generation,
    GenerationTimeout,
    InvalidRequest,
    Job,
    NotServing,
    ServedPolicy,
    TokenLogprob,
)
from training.generation import (
    EngineClosed,
    EngineEvent,
    Errored,
    Finished,
    SequenceRequest,
    TextDelta,
    TokenAlternatives,
)


class LocalEngine(EngineBase):
    """A causal LM in this process behind the generation engine's continuous batching."""

    supports_logprobs = True

    def __init__(self, policy: ServedPolicy, *, max_batch: int = 16, max_queue: int = 32,
                 device: str = "cpu", dtype: str = "float32", max_context: int | None = None,
                 kv_cache_gb: float = 2.0):
        from training.generation import GenerationEngine
        from training.models import resolve_model

        super().__init__(policy)
        self.max_pending = max_batch + max_queue
        self.max_queue = max_queue
        self.generator = GenerationEngine.from_pretrained(
            resolve_model(policy.weights_uri), dtype=dtype, device=device, max_batch=max_batch,
            max_context=max_context, kv_cache_gb=kv_cache_gb)
        self.tokenizer: Any = self.generator.tokenizer
        self.generator.start()

    def close(self) -> None:
        """Refuse new work now; stop the engine's thread and drop the model in another thread
        (this is called on the event loop when a retired version's last request ends, and the
        engine finishes its current step first)."""
        self._closed = True
        threading.Thread(target=self.generator.close, daemon=True,
                         name=f"close-{self.policy.name}").start()

    def _encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            # /v1/completions: the prompt as is, no special tokens added.
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"{self.policy.name!r} has no chat template: use "
                                 "/v1/completions with a text prompt")
        try:
            return self.generator.encode(prompt)
        except Exception as exc:
            # A template may refuse the messages (raise_exception: a system role it does not
            # take, turns that do not alternate): the request's fault, a 400.
            raise InvalidRequest(f"the chat template of {self.policy.name!r} refused these "
                                 f"messages: {exc}") from exc

    def _enqueue(self, job: Job) -> None:
        if self.generator.busy >= self.max_pending:
            raise Busy(f"{self.max_queue} requests are already waiting; retry")
        request = job.request
        prompt_ids = self._encode(request.prompt)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        sequence = SequenceRequest(
            tuple(prompt_ids), request.max_tokens, temperature=request.temperature,
            top_p=request.top_p, stop=request.stop, seed=request.seed,
            top_logprobs=request.top_logprobs, stream=True)
        try:
            handle = self.generator.submit(sequence, lambda event: self._relay(job, event))
        except EngineClosed as exc:
            raise NotServing(f"{self.policy.name!r} was unloaded") from exc
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        job.on_cancel = handle.cancel
        if job.cancelled.is_set():  # cancelled before the handle existed
            handle.cancel()

    def _relay(self, job: Job, event: EngineEvent) -> None:
        """The generation engine's events as the serving interface's (on the engine thread)."""
        if isinstance(event, TextDelta):
            job.send(Delta(event.text))
        elif isinstance(event, Errored):
            error = event.error
            job.send(Failed(NotServing(f"{self.policy.name!r} was unloaded")
                            if isinstance(error, EngineClosed) else
                            EngineFailed(f"generation failed: {type(error).__name__}: {error}")))
        elif isinstance(event, Finished):
            result = event.result
            if result.finish_reason == "cancelled":
                job.send(Failed(GenerationTimeout("cancelled")))
                return
            logprobs = None
            if result.alternatives is not None:
                logprobs = token_logprobs(self.tokenizer, result.completion_ids,
                                          result.alternatives, text=result.text,
                                          eos_ids=self.generator.eos_ids)
            job.send(Done(Generation(
                text=result.text, prompt_tokens=len(result.prompt_ids),
                completion_tokens=len(result.completion_ids),
                finish_reason="stop" if result.finish_reason == "stop" else "length",
                logprobs=logprobs)))


def token_logprobs(tokenizer: Any, generated: Sequence[int],
                   alternatives: Sequence[TokenAlternatives], *, text: str,
                   eos_ids: frozenset[int]) -> tuple[TokenLogprob, ...]:
    """OpenAI's per-token log-probabilities for the tokens that spell `text`: an
    end-of-sequence token, and the tokens after a stop string (generated, but not part of the
    answer), are left out."""
    count = len(generated)
    while count and generated[count - 1] in eos_ids:
        count -= 1
    if tokenizer.decode(generated[:count], skip_special_tokens=True) != text:
        # A stop string cut the text: the fewest tokens whose text reaches past its end.
        low, high = 0, count
        while low < high:
            middle = (low + high) // 2
            if len(tokenizer.decode(generated[:middle], skip_special_tokens=True)) >= len(text):
                high = middle
            else:
                low = middle + 1
        count = low
    return tuple(
        TokenLogprob(tokenizer.decode([generated[step]]),
                     max(alternatives[step].logprob, MIN_LOGPROB),
                     tuple((tokenizer.decode([token]), max(value, MIN_LOGPROB))
                           for token, value in alternatives[step].top))
        for step in range(count))
